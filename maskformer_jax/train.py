"""Train MaskFormer, evaluating as it goes: the one training loop, top to bottom (big_vision style).

  python -m maskformer_jax.train --config configs/demo.py --workdir runs/demo \
      [--config.total_steps=2000] [--config.data.root=/data/coco]

The same command runs on a laptop CPU and on every host of a TPU pod (`jax.distributed.initialize()` is
called when a cluster is detected, or with --coordinator_address for CPU multi-process runs). Only
process 0 writes logs, metrics.jsonl and TensorBoard; every process takes part in checkpointing and
evaluation. A workdir with checkpoints is resumed from its newest complete one, data position included,
so an interrupted and resumed run ends with the same parameters as an uninterrupted one. SIGTERM
(preemption) saves at the next step boundary and exits 0.
"""
import math
import os
import signal
import sys
import time

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from maskformer_jax import checkpoint
from maskformer_jax import metrics as metrics_lib
from maskformer_jax import paths

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py.")
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard go here (local or gs://).")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for a multi-process run outside a "
                    "TPU pod (e.g. CPU tests); TPU pods are detected without it.")
flags.DEFINE_integer("num_processes", 1, "With --coordinator_address: number of processes.")
flags.DEFINE_integer("process_id", 0, "With --coordinator_address: this process's index.")


def _multihost_environment() -> bool:
  """A TPU pod slice (several workers), Multislice, or a SLURM / MPI job of several tasks."""
  env = os.environ
  return ("," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env
          or int(env.get("SLURM_NTASKS", "1") or 1) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1)


def initialize_distributed(coordinator_address="", num_processes=1, process_id=0):
  """jax.distributed.initialize() for pods (auto-detected) or explicit CPU multi-process runs."""
  if coordinator_address:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _multihost_environment():
    jax.distributed.initialize()  # TPU pod / SLURM / MPI: everything is detected from the environment


# ------------------------------------------------------------------------------------------------
# Configuration checks: everything that can be known wrong before building and compiling the model.

_CHOICES = {
    ("model", "backbone"): ("resnet",),  # Swin: not yet implemented
    ("model", "backbone_norm"): ("frozen_bn", "bn"),
    ("model", "pixel_decoder"): ("base", "transformer_encoder"),
    ("model", "dtype"): ("float32", "bfloat16"),
    ("optim", "schedule"): ("step", "poly"),
    ("loss", "matcher"): ("jax", "scipy"),
    ("eval", "task"): ("panoptic", "semantic", "instance"),
    ("data", "dataset"): ("coco_panoptic", "ade20k", "tfds_coco_panoptic"),
    ("data", "bad_input"): ("skip", "raise"),
}


def validate_config(config, *, num_devices: int, num_processes: int):
  """Raises ValueError listing every mistake found and what to change; returns the mesh shape."""
  errors = []
  for (section, key), allowed in _CHOICES.items():
    value = config[section][key]
    if value not in allowed:
      errors.append(f"config.{section}.{key}={value!r} is not one of {allowed}.")
  for key in ("total_steps", "batch_size", "grad_accum_steps"):
    if int(config[key]) < 1:
      errors.append(f"config.{key}={config[key]} must be >= 1.")
  for key in ("log_every", "checkpoint_every", "keep_checkpoints", "checkpoint_timeout_s",
              "max_consecutive_skipped"):
    if int(config.train[key]) < 1:
      errors.append(f"config.train.{key}={config.train[key]} must be >= 1.")
  if config.model.num_queries < 1 or config.model.num_classes < 1:
    errors.append("config.model.num_queries and config.model.num_classes must be >= 1.")
  for key in ("image_size", "eval_size"):
    size = tuple(config.data[key])
    if len(size) != 2 or any(int(s) % 32 for s in size):
      errors.append(f"config.data.{key}={size} must be (H, W) with multiples of 32 (the backbone's "
                    f"stride), e.g. {tuple(max(32, int(math.ceil(s / 32)) * 32) for s in size)}.")

  # The mesh and the batch split over it.
  model_axis, data_axis = int(config.mesh.model), int(config.mesh.data)
  if model_axis < 1 or num_devices % model_axis:
    errors.append(f"config.mesh.model={model_axis} does not divide the {num_devices} devices: use a "
                  f"divisor of {num_devices}.")
    data_axis = None
  elif data_axis == -1:
    data_axis = num_devices // model_axis
  elif data_axis * model_axis != num_devices:
    errors.append(f"config.mesh.data={data_axis} x config.mesh.model={model_axis} = "
                  f"{data_axis * model_axis} devices, but {num_devices} are available: set "
                  f"--config.mesh.data=-1 (all devices the model axis leaves) or make data*model = "
                  f"{num_devices}.")
    data_axis = None
  accum = max(int(config.grad_accum_steps), 1)
  if config.batch_size % accum:
    errors.append(f"config.batch_size={config.batch_size} is not divisible by "
                  f"config.grad_accum_steps={accum}.")
  micro = config.batch_size // accum
  if data_axis and micro % data_axis:
    errors.append(f"The global batch config.batch_size={config.batch_size} (per micro-batch {micro}) is "
                  f"not divisible by the {data_axis} devices of the mesh data axis: use a multiple of "
                  f"{data_axis * accum} (e.g. --config.batch_size={data_axis * accum * max(1, round(micro / data_axis))}), "
                  f"or change --config.mesh.data/--config.mesh.model.")
  if config.batch_size % num_processes:
    errors.append(f"config.batch_size={config.batch_size} is not divisible by the {num_processes} "
                  f"processes (hosts): use a multiple of {num_processes}.")
  if data_axis and config.eval.batch_size % data_axis:
    errors.append(f"config.eval.batch_size={config.eval.batch_size} is not divisible by the {data_axis} "
                  f"devices of the mesh data axis: use a multiple of {data_axis}.")
  if config.eval.batch_size % num_processes:
    errors.append(f"config.eval.batch_size={config.eval.batch_size} is not divisible by the "
                  f"{num_processes} processes: use a multiple of {num_processes}.")
  if config.eval.task == "instance" and config.train.eval_every > 0:
    errors.append("config.eval.task='instance' has no evaluation metric here (COCO AP is not "
                  "implemented): use 'panoptic' or 'semantic', or set --config.train.eval_every=0.")
  for key in ("torchvision_resnet", "checkpoint"):
    path = config.init[key]
    if path and not path.startswith("gs://") and not os.path.exists(path):
      errors.append(f"config.init.{key}={path!r} does not exist.")
  if errors:
    raise ValueError("Configuration errors (nothing was compiled):\n  - " + "\n  - ".join(errors))
  return data_axis, model_axis


def check_categories(config, categories):
  """The model's K must match the dataset's class count (a mismatch trains silently wrong)."""
  k = len(categories)
  if k != config.model.num_classes:
    raise ValueError(f"config.model.num_classes={config.model.num_classes} but the dataset "
                     f"{config.data.dataset!r} at {config.data.root!r} has {k} categories: set "
                     f"--config.model.num_classes={k}.")


def synthetic_root(config) -> str:
  """With config.data.root == "", the synthetic COCO-format dataset (generated once, then cached)."""
  from maskformer_jax.data import synthetic
  s = config.data.get("synthetic", None)
  num_train = int(s.num_train) if s else 1000
  num_val = int(s.num_val) if s else 100
  size = tuple(int(x) for x in (s.image_size if s else config.data.image_size))
  cache = os.environ.get("MASKFORMER_DATA") or os.path.join(
      os.path.expanduser("~"), ".cache", "maskformer_jax")
  root = os.path.join(cache, f"synthetic_{num_train}_{num_val}_{size[0]}x{size[1]}_s{config.seed}")
  if jax.process_index() == 0:
    synthetic.generate(root, num_train=num_train, num_val=num_val, image_size=size, seed=config.seed)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("synthetic_data")
  return root


def resolve_data_root(config):
  if not config.data.root and config.data.dataset == "coco_panoptic":
    with config.unlocked():
      config.data.root = synthetic_root(config)
      logging.info("config.data.root is empty: using the synthetic dataset at %s", config.data.root)
  return config


# ------------------------------------------------------------------------------------------------
# Preemption: SIGTERM sets a flag; the loop saves and exits at the next step boundary.

class _Stop:
  requested = False


def _on_sigterm(signum, frame):
  del frame
  logging.warning("Signal %d received: saving a checkpoint at the next step boundary, then exiting.",
                  signum)
  _Stop.requested = True


def stop_requested(step: int) -> bool:
  if jax.process_count() > 1:
    # All hosts must agree on the step: JAX's preemption service (it handles SIGTERM itself).
    from jax.experimental import multihost_utils
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:
      return False
  return _Stop.requested


# ------------------------------------------------------------------------------------------------

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


def load_pretrained(config, state, mesh):
  """Initial weights from config.init (a converted checkpoint, or a torchvision ResNet backbone)."""
  from maskformer_jax import convert
  if config.init.checkpoint:
    _, variables = convert.load_converted(config.init.checkpoint)
    state = _merge_variables(state, variables, what=config.init.checkpoint)
  elif config.init.torchvision_resnet:
    ours = jax.device_get({col: state[col] for col in ("params", "batch_stats") if state.get(col)})
    variables = convert.load_torchvision_resnet(config.init.torchvision_resnet, ours)
    state = _merge_variables(state, variables, what=config.init.torchvision_resnet)
  return state


def _merge_variables(state, variables, *, what):
  """Replaces the matching leaves of state['params'] / state['batch_stats'] (same shapes required)."""
  import flax
  for col in ("params", "batch_stats"):
    if col not in variables or col not in state or state[col] is None:
      continue
    ours = flax.traverse_util.flatten_dict(flax.core.unfreeze(state[col]), sep="/")
    theirs = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables[col]), sep="/")
    missing = [k for k in theirs if k not in ours]
    if missing:
      raise ValueError(f"{what}: {len(missing)} {col} entries are not in the model, e.g. {missing[:3]}")
    for k, v in theirs.items():
      if tuple(ours[k].shape) != tuple(np.shape(v)):
        raise ValueError(f"{what}: {col} {k} has shape {np.shape(v)}, the model {ours[k].shape}")
      ours[k] = jax.device_put(jnp.asarray(v, ours[k].dtype), ours[k].sharding)
    logging.info("Loaded %d of %d %s arrays from %s", len(theirs), len(ours), col, what)
    state = {**state, col: flax.traverse_util.unflatten_dict(ours, sep="/")}
  return state


def train_and_evaluate(config, workdir: str):
  """Runs (or resumes) training in `workdir` up to config.total_steps; returns the final state."""
  t_start = time.time()
  validate_config(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  from maskformer_jax import evaluate as evaluate_lib
  from maskformer_jax import sharding
  from maskformer_jax import train_step as train_step_lib
  from maskformer_jax.data import pipeline
  from maskformer_jax.models import build_model

  config = resolve_data_root(config)
  mesh = sharding.make_mesh(config.mesh)
  train_source = pipeline.make_source(config, config.data.train_split)
  check_categories(config, train_source.categories)
  val_source = pipeline.make_source(config, config.data.val_split) if config.train.eval_every > 0 else None
  metrics_lib.log(f"{jax.process_count()} process(es), {jax.device_count()} devices, mesh "
                  f"{dict(mesh.shape)}; workdir {workdir}")

  model = build_model(config.model)
  state = train_step_lib.init_state(config, model, mesh, jax.random.key(config.seed))
  loader = pipeline.make_loader(config, config.data.train_split, train=True, seed=config.seed,
                                shard_index=jax.process_index(), shard_count=jax.process_count())
  data_iter = iter(loader)

  best_metric = evaluate_lib.best_metric(config)
  manager = checkpoint.make_manager(workdir, keep=config.train.keep_checkpoints, best_metric=best_metric,
                                    timeout_s=config.train.checkpoint_timeout_s)
  saver = checkpoint.Saver(manager, config.train.checkpoint_timeout_s)
  restored, step = checkpoint.restore(manager, state, data_iter)
  if restored is None:
    state, step = load_pretrained(config, state, mesh), 0
  else:
    state = restored
    metrics_lib.log(f"Resumed from the checkpoint at step {step}.")
  writer = metrics_lib.MetricWriter(workdir, resume_step=step)
  if jax.process_index() == 0:  # what this workdir was trained with, overrides included
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))

  train_step = train_step_lib.make_train_step(config, model, mesh)
  eval_step = train_step_lib.make_eval_step(config, model, mesh)
  total = int(config.total_steps)
  progress = metrics_lib.Progress(total, config.batch_size, start_step=step)
  divergence = Divergence(config.train.max_consecutive_skipped, start_step=step)

  def run_eval(step):
    t = time.time()
    row, images = evaluate_lib.evaluate(config, model, state, mesh, eval_step,
                                        num_images=config.train.image_summaries, source=val_source)
    row["eval_time_s"] = time.time() - t
    row["wall_time_s"] = time.time() - t_start
    writer.write(step, row, prefix="eval")
    if images is not None:
      writer.images(step, "eval/image_gt_prediction", images)
    writer.flush()
    metrics_lib.log(f"eval at step {step}: " + " ".join(
        f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float)))
    return row

  _Stop.requested = False
  previous_handler = None
  if jax.process_count() == 1:
    previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
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

      if step % config.train.log_every == 0 or step == total:
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
      eval_row = None
      if not stop and config.train.eval_every > 0 and (step % config.train.eval_every == 0 or step == total):
        eval_row = run_eval(step)
      if stop or step == total or step % config.train.checkpoint_every == 0 or eval_row:
        if pending:
          divergence.update(step, pending[-1])  # never save a step that should have stopped the run
        score = {best_metric: eval_row[best_metric]} if eval_row and best_metric in eval_row else None
        saver.save(step, state, data_iter, metrics=score, wait=stop or step == total)
      if stop:
        metrics_lib.log(f"Stopped by a signal: saved step {step}; rerun the same command to resume.")
        break
    saver.finish()
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


def quiet_library_logs():
  """Orbax and grain log every save/restore at INFO; keep their warnings, drop the rest."""
  import logging as std_logging

  class Quiet(std_logging.Filter):
    def filter(self, record):
      noisy = any(s in record.pathname for s in ("/orbax/", "/grain/", "/jax/_src/"))
      return record.levelno >= std_logging.WARNING or not noisy

  logging.get_absl_handler().addFilter(Quiet())


def exit_on_save_error(e):
  """A failed or hung checkpoint save ends the process now: orbax's stuck writer threads would
  otherwise keep it alive at exit (a pod slice idling on a dead save)."""
  logging.error("%s", e)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(1)


def main(argv):
  del argv
  quiet_library_logs()
  flags.mark_flags_as_required(["config", "workdir"])
  initialize_distributed(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                         flags.FLAGS.process_id)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  config = paths.absolute_config_paths(_CONFIG.value)
  try:
    train_and_evaluate(config, paths.absolute(flags.FLAGS.workdir))
  except checkpoint.SaveError as e:
    exit_on_save_error(e)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
