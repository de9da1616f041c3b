"""Command line: train MaskFormer, evaluating as it goes (the loop is maskformer_jax/training.py).

  python -m maskformer_jax.train --config configs/demo.py --workdir runs/demo \
      [--config.total_steps=2000] [--config.data.root=/data/coco]

The same command runs on a laptop CPU and on every host of a TPU pod (`jax.distributed.initialize()` is
called when a cluster is detected, or with --coordinator_address for CPU multi-process runs). A workdir
with checkpoints is resumed; SIGTERM (preemption) saves at the next step boundary and exits 0.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from maskformer_jax import checkpoint
from maskformer_jax import paths
from maskformer_jax import startup
from maskformer_jax import training

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py or "
                                          "configs/coco_panoptic.py:backbone=r101.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard go here "
                               "(local or gs://).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for a "
                                   "multi-process run outside a TPU pod (e.g. CPU tests); TPU pods are "
                                   "detected without it.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "With --coordinator_address: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "With --coordinator_address: this process's index.")


def main(argv):
  del argv
  config = startup.start(_CONFIG.value, coordinator_address=_COORDINATOR.value,
                         num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  try:
    training.train_and_evaluate(config, paths.absolute(_WORKDIR.value))
  except checkpoint.SaveError as e:
    startup.exit_on_save_error(e)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
