"""Training with evaluation as it goes: the one loop, top to bottom (`python -m maskformer_jax.train`).

A workdir with checkpoints is resumed from its newest complete one, data position included, so an
interrupted and resumed run ends with the same parameters as an uninterrupted one. Only process 0 writes
logs, metrics.jsonl and TensorBoard; every process takes part in checkpointing and evaluation. SIGTERM
(preemption) saves at the next step boundary and the run returns.
"""
import signal
import time

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from maskformer_jax import card as card_lib
from maskformer_jax import checkpoint
from maskformer_jax import config as config_lib
from maskformer_jax import convert
from maskformer_jax import metrics as metrics_lib
from maskformer_jax import sharding
from maskformer_jax import train_step as train_step_lib
from maskformer_jax.data import coco_panoptic
from maskformer_jax.data import pipeline
from maskformer_jax.data import synthetic
from maskformer_jax.evaluation import common as evaluation
from maskformer_jax.models import build_model

SKIPS_DIR = "skipped_inputs"  # in the workdir: the training data's skip counts, a file per reading process


def itstime(step: int, every: int, total: int) -> bool:
  """Whether a periodic action with period `every` (0: never) runs after `step`: every `every` steps
  and at the last step."""
  return every > 0 and (step % every == 0 or step == total)


def train_and_evaluate(config, workdir: str):
  """Runs (or resumes) training in `workdir` up to config.total_steps; returns the final state."""
  t_start = time.time()
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  config = synthetic.resolve_data_root(config)
  mesh = sharding.make_mesh(config.mesh)
  train_source = pipeline.make_source(config, config.data.train_split, require_segments=True)
  if hasattr(train_source, "policy"):  # every reading process keeps its skip counts there, for the card
    train_source.policy.record_to(epath.Path(workdir) / SKIPS_DIR)
  evaluators = evaluation.from_config(config)
  eval_sources = {name: pipeline.make_source(config, evaluation.split(config, ev))  # fail before compiling
                  for name, ev in config.evals.items() if ev.every > 0}
  metrics_lib.log(f"{jax.process_count()} process(es), {jax.device_count()} devices, mesh "
                  f"{dict(mesh.shape)}; workdir {workdir}")

  model = build_model(config.model)
  shardings = train_step_lib.state_shardings(config, model, mesh)  # traced once, used by everything below
  state = train_step_lib.init_state(config, model, mesh, jax.random.key(config.seed), shardings)
  loader = pipeline.make_loader(config, config.data.train_split, train=True, seed=config.seed,
                                source=train_source, shard_index=jax.process_index(),
                                shard_count=jax.process_count())
  data_iter = iter(loader)

  best_metric = config.train.best_metric
  manager = checkpoint.make_manager(workdir, keep=config.train.keep_checkpoints, best_metric=best_metric,
                                    timeout_s=config.train.checkpoint_timeout_s)
  saver = checkpoint.Saver(manager, config.train.checkpoint_timeout_s)
  restored, step = checkpoint.restore(manager, state, data_iter)
  if restored is None:
    state, step = convert.load_pretrained(config, state), 0
  else:
    state = restored
    metrics_lib.log(f"Resumed from the checkpoint at step {step}.")
  writer = metrics_lib.MetricWriter(workdir, resume_step=step)
  if jax.process_index() == 0:  # what this workdir was trained with, overrides included
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))

  train_step = train_step_lib.make_train_step(config, model, mesh, shardings)
  eval_step = train_step_lib.make_eval_step(config, model, mesh, shardings)
  total = int(config.total_steps)
  progress = metrics_lib.Progress(total, config.batch_size, start_step=step)
  divergence = Divergence(config.train.max_consecutive_skipped, start_step=step)

  last_evals = {}  # name -> the last row of each evaluator, with its settings (for the model card)

  def run_evals(step):
    """Every evaluator due at `step`; returns {'<name>/<metric>': value} of those that ran."""
    scores = {}
    for name, run in evaluators.items():
      if not itstime(step, config.evals[name].every, total):
        continue
      t = time.time()
      row, images = run(state, mesh, eval_step, source=eval_sources[name])
      row.update(eval_time_s=time.time() - t, wall_time_s=time.time() - t_start)
      writer.write(step, {"eval": name, **row}, prefix=name)
      if images is not None:
        writer.images(step, f"{name}/image_gt_prediction", images)
      writer.flush()
      metrics_lib.log(f"eval {name} at step {step}: " + " ".join(
          f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float)))
      scores.update({f"{name}/{k}": v for k, v in row.items()})
      last_evals[name] = {"step": step, **{k: v for k, v in row.items() if isinstance(v, int | float)},
                          "settings": config.evals[name].to_dict()}
    return scores

  previous_handler = watch_preemption(step)
  pending = []
  skipped_total = int(jax.device_get(state["skipped"])) if "skipped" in state else 0
  try:
    while step < total:
      batch = next(data_iter)
      state, step_metrics = train_step(state, train_step_lib.shard_batch(batch, mesh))
      step += 1
      pending.append(step_metrics)
      saver.poll()  # a failed or hung background save stops the run here, not a save interval later
      # The previous step's skip flag: that step is done (or nearly), so reading it keeps this one in flight.
      divergence.update(step - 1, pending[-2] if len(pending) > 1 else None)

      if itstime(step, config.train.log_every, total):
        row = mean_metrics(pending)  # the only host sync of the loop
        skipped_total += round(row.pop("skipped", 0.0) * len(pending))  # non-finite updates dropped
        last, pending = pending[-1], []
        p = progress.update(step)
        row.update(skipped_steps=skipped_total, steps_per_s=p["steps_per_s"],
                   images_per_s=p["images_per_s"], eta_s=p["eta_s"], wall_time_s=time.time() - t_start)
        writer.write(step, row, prefix="train")
        metrics_lib.log(progress.line(step, row.get("loss", float("nan")), p))
        divergence.update(step, last)  # after the row: it shows the step that stopped the run

      stop = stop_requested(step)  # preempted: save now, skip the evaluation (the grace period is short)
      scores = {} if stop else run_evals(step)
      if stop or scores or itstime(step, config.train.checkpoint_every, total):
        if pending:
          divergence.update(step, pending[-1])  # never save a step that should have stopped the run
        score = {best_metric: scores[best_metric]} if best_metric in scores else None
        saver.save(step, state, data_iter, metrics=score, wait=stop or step == total)
      if stop:
        metrics_lib.log(f"Stopped by a signal: saved step {step}; rerun the same command to resume.")
        break
    saver.finish()
    if not _Stop.requested:  # preempted: the grace period is short, and the resumed run writes it
      write_card(config, workdir, model, mesh, state, step=step, skipped=skipped_total,
                 wall_time_s=time.time() - t_start, evals=last_evals, source=train_source)
  except BaseException:
    try:  # let a save in flight complete (bounded), but report the error that stopped the run
      saver.finish(timeout_s=min(60.0, saver.timeout_s))
    except checkpoint.SaveError as e:
      logging.error("%s", e)
    raise
  finally:
    writer.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
  return state


def write_card(config, workdir, model, mesh, state, *, step, skipped, wall_time_s, evals, source):
  """The model card of the saved final state (maskformer_jax.card). A card that cannot be written is
  an error in the log, not a lost run: the checkpoint is already saved."""
  training = {"step": int(step), "total_steps": int(config.total_steps),
              "global_batch": int(config.batch_size), "grad_accum_steps": int(config.grad_accum_steps),
              "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
              "mesh": {k: int(v) for k, v in mesh.shape.items()}, "processes": jax.process_count(),
              "skipped_steps": int(skipped), "wall_time_s": round(float(wall_time_s), 1)}
  try:
    card_lib.write_training_card(workdir, config, model, state, training=training, metrics=evals,
                                 source=source, split=config.data.train_split,
                                 skipped_inputs=coco_panoptic.recorded_skips(epath.Path(workdir) / SKIPS_DIR))
  except Exception as e:  # noqa: BLE001
    logging.error("The model card of %s was not written: %s: %s", workdir, type(e).__name__, e)
    return
  metrics_lib.log(f"Model card: {workdir}/card.json (python -m maskformer_jax.card verify {workdir})")


def mean_metrics(pending) -> dict:
  """Host-side means of the (sum, count) metric pairs of the steps since the last log."""
  pending = jax.device_get(pending)
  out = {}
  for key in pending[0]:
    v = pending[0][key]
    if isinstance(v, tuple | list) and len(v) == 2:
      s = sum(float(np.asarray(m[key][0])) for m in pending)
      c = sum(float(np.asarray(m[key][1])) for m in pending)
      out[key] = s / max(c, 1e-12)
    else:
      out[key] = float(np.mean([np.asarray(m[key]) for m in pending]))
  if "learning_rate" in pending[-1]:  # the current one, not the interval's mean
    out["learning_rate"] = float(np.asarray(pending[-1]["learning_rate"][0]))
  return out


# ------------------------------------------------------------------------------------------------
# Preemption. One process: SIGTERM sets a flag; the loop saves and exits at the next step boundary.
# Several: every process must stop at the same step (the save is collective), so JAX's preemption
# service (started by jax.distributed.initialize; it handles SIGTERM itself) agrees on the step.

class _Stop:
  requested = False
  service = False  # several processes: the preemption service answers


def _on_sigterm(signum, frame):
  del frame
  logging.warning("Signal %d received: saving a checkpoint at the next step boundary, then exiting.",
                  signum)
  _Stop.requested = True


def watch_preemption(step: int):
  """Arms preemption handling before the loop; returns the SIGTERM handler to restore afterwards (one
  process) or None. Several processes without the preemption service get a warning, not silence."""
  _Stop.requested, _Stop.service = False, False
  if jax.process_count() == 1:
    return signal.signal(signal.SIGTERM, _on_sigterm)
  try:  # also a probe: a notice that came before the loop counts (every process gets the same answer)
    _Stop.requested = bool(multihost_utils.reached_preemption_sync_point(step))
    _Stop.service = True
  except RuntimeError as e:
    logging.warning(
        "Preemption handling is off on this %d-process run: JAX's preemption service is unavailable "
        "(%s). SIGTERM will end the run without a checkpoint; it resumes from the last periodic one "
        "(config.train.checkpoint_every).", jax.process_count(), e)
  return None


def stop_requested(step: int) -> bool:
  if jax.process_count() > 1 and _Stop.service and not _Stop.requested:
    _Stop.requested = bool(multihost_utils.reached_preemption_sync_point(step))
    if _Stop.requested:  # on every process: each log shows where it stopped
      logging.warning("Preemption notice: process %d saves at step %d, then exits.",
                      jax.process_index(), step)
  return _Stop.requested


# ------------------------------------------------------------------------------------------------
# Divergence: too many non-finite steps in a row stop the run.

class DivergedError(RuntimeError):
  """Too many consecutive non-finite steps: the run stops instead of idling to total_steps."""


class Divergence:
  """Counts consecutive steps whose update was skipped as non-finite (loss or gradient NaN/inf).

  Fed each step's metrics once, in order (a step already counted is ignored); raises DivergedError when
  `limit` steps in a row were skipped: like big_vision stopping on a NaN loss, but tolerant of the odd
  bad batch, and instead of running to total_steps without a single update.
  """

  def __init__(self, limit: int, start_step: int = 0):
    self.limit, self.counted, self.run = int(limit), int(start_step), 0

  def update(self, step: int, metrics):
    if metrics is None or step <= self.counted:
      return
    self.counted = step
    skipped = float(np.asarray(jax.device_get(metrics["skipped"][0]))) > 0
    self.run = self.run + 1 if skipped else 0
    if self.run >= self.limit:
      raise DivergedError(
          f"{self.run} consecutive steps (up to step {step}) had a non-finite loss or gradient, so no "
          f"update was applied (config.train.max_consecutive_skipped={self.limit}). Training stopped; the "
          "checkpoints saved before are kept and hold finite parameters. Lower config.optim.base_lr, "
          "check the data (python -m maskformer_jax.data.check) or try float32, then resume or start "
          "a new --workdir.")
