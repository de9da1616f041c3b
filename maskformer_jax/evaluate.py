"""Command line: evaluate a checkpoint with the evaluators of config.evals (PQ, mIoU) on whole splits.

  python -m maskformer_jax.evaluate --workdir runs/demo [--checkpoint best|STEP] [--evals val]
      [--config configs/demo.py]   (default: the config the workdir was trained with, its config.json)

Each evaluator's row goes to WORKDIR/metrics.jsonl and TensorBoard (as `<name>/<metric>`) and is printed
as one JSON line {"step", "eval", ...}. The evaluators are maskformer_jax/evaluation/.
"""
import json

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from maskformer_jax import checkpoint
from maskformer_jax import config as config_lib
from maskformer_jax import metrics as metrics_lib
from maskformer_jax import paths
from maskformer_jax import sharding
from maskformer_jax import startup
from maskformer_jax import train_step as train_step_lib
from maskformer_jax.data import synthetic
from maskformer_jax.evaluation import common as evaluation
from maskformer_jax.models import build_model

_CONFIG = config_flags.DEFINE_config_file("config", None, "The config the workdir was trained with "
                                          "(default: WORKDIR/config.json).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (local or gs://); rows are appended to "
                               "its metrics.jsonl.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' (by config.train.best_metric) "
                                  "or a step number.")
_EVALS = flags.DEFINE_list("evals", [], "Names of config.evals to run (default: all of them).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for a "
                                   "multi-process run outside a TPU pod.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "With --coordinator_address: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "With --coordinator_address: this process's index.")


def main(argv):
  del argv
  workdir = paths.absolute(_WORKDIR.value)
  config = startup.start(_CONFIG.value or startup.checkpoint_config(workdir),
                         coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                         process_id=_PROCESS_ID.value)
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  evaluators = evaluation.from_config(config)
  unknown = sorted(set(_EVALS.value) - set(evaluators))
  if unknown:
    raise SystemExit(f"--evals: {unknown} not in config.evals ({sorted(evaluators)}).")
  config = synthetic.resolve_data_root(config)
  mesh = sharding.make_mesh(config.mesh)
  model = build_model(config.model)
  shardings = train_step_lib.state_shardings(config, model, mesh)
  state, step = checkpoint.load_state(config, model, mesh, workdir, _CHECKPOINT.value, shardings)
  eval_step = train_step_lib.make_eval_step(config, model, mesh, shardings)
  writer = metrics_lib.MetricWriter(workdir)
  for name, run in evaluators.items():
    if _EVALS.value and name not in _EVALS.value:
      continue
    row, images = run(state, mesh, eval_step)
    row["checkpoint_step"] = step
    writer.write(step, {"eval": name, **row}, prefix=name)
    if images is not None:
      writer.images(step, f"{name}/image_gt_prediction", images)
    if jax.process_index() == 0:
      print(json.dumps({"step": step, "eval": name, **row}))
  writer.close()


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
