"""What every command does before its work: logging, the distributed runtime, the config's paths.

The command-line modules (train, evaluate, predict) hold only their flags and `main()`; they call
`start()` and then the library. Nothing here defines flags.
"""
import logging as std_logging
import os
import sys

from absl import logging
import jax

from maskformer_jax import paths


def multihost_environment() -> bool:
  """A TPU pod slice (several workers), Multislice, or a SLURM / MPI job of several tasks."""
  env = os.environ
  return ("," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env
          or int(env.get("SLURM_NTASKS", "1") or 1) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1)


def initialize_distributed(coordinator_address="", num_processes=1, process_id=0):
  """jax.distributed.initialize() for pods (auto-detected) or explicit CPU multi-process runs (gloo)."""
  if coordinator_address:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif multihost_environment():
    jax.distributed.initialize()  # TPU pod / SLURM / MPI: everything is detected from the environment


class _QuietLibraries(std_logging.Filter):
  """Orbax and grain log every save/restore at INFO; keep their warnings, drop the rest."""

  def filter(self, record):
    noisy = any(s in record.pathname for s in ("/orbax/", "/grain/", "/jax/_src/"))
    return record.levelno >= std_logging.WARNING or not noisy


def quiet_library_logs():
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def start(config, *, coordinator_address="", num_processes=1, process_id=0, distributed=True):
  """Quiet library logs, start the distributed runtime (unless `distributed` is False), log at WARNING
  on processes other than 0, and return the config with its local paths made absolute."""
  quiet_library_logs()
  if distributed:
    initialize_distributed(coordinator_address, num_processes, process_id)
    if jax.process_index() != 0:
      logging.set_verbosity(logging.WARNING)
  return paths.absolute_config_paths(config)


def checkpoint_config(path):
  """The config a checkpoint was made with (its config.json), for commands run without --config."""
  from maskformer_jax import checkpoint  # the heavy imports only for the commands that need them
  try:
    return checkpoint.load_config(path)
  except FileNotFoundError as e:
    raise SystemExit(f"{e} Or give --config.") from None


def exit_on_save_error(e):
  """A failed or hung checkpoint save ends the process now: orbax's stuck writer threads would
  otherwise keep it alive at exit (a pod slice idling on a dead save)."""
  logging.error("%s", e)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(1)
