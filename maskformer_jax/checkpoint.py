"""Orbax checkpoints of the train state together with the data iterator state.

One step directory holds `state` (the plain-dict train state, written asynchronously, every process
writing its shards) and `data` (each process's grain iterator state), so a resumed run sees exactly the
batches the uninterrupted run would have seen. Orbax writes into a temporary directory and renames it
when complete, so a run killed mid-save (even SIGKILL) leaves only complete checkpoints behind; a
checkpoint that is damaged afterwards (a truncated or deleted file) makes `restore` fall back to the
previous one with a warning, and moves the damaged one aside to `WORKDIR/corrupted_checkpoints/`.

Kept: the last `keep` steps plus the best by the evaluation metric (`config.train.best_metric`, e.g. `val/pq`), which the train
loop attaches to the checkpoints it saves right after an evaluation.

A save that fails (unwritable directory, full disk, a library error) or does not finish within
`timeout_s` must stop training at once: `Saver` checks the background save at every step and raises
`SaveError` naming the step directory and the cause, and every wait on a save is bounded. The earlier
complete checkpoints are untouched (orbax deletes old steps only after a new one is complete).
"""
import json
import math
import os
import threading
import time

from absl import logging
from etils import epath
import grain.checkpoint
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from maskformer_jax import config as config_lib
from maskformer_jax import convert
from maskformer_jax import paths
from maskformer_jax import train_step as train_step_lib

DEFAULT_TIMEOUT_S = 600


class SaveError(RuntimeError):
  """A checkpoint save failed or hung; the message names the directory and the cause."""


class _IteratorState:
  """Stands in for a grain iterator in grain's orbax handler: the state is captured when the save is
  issued (the real iterator keeps moving while an asynchronous save runs) and handed back on restore."""

  def __init__(self, state: bytes = b""):
    self.state = state

  def get_state(self) -> bytes:
    return self.state

  def set_state(self, state: bytes):
    self.state = state

  def start_prefetch(self):
    pass


def _iterator_state(iterator) -> bytes:
  state = iterator.get_state()
  return state if isinstance(state, bytes) else json.dumps(state).encode()


def _set_iterator_state(iterator, state: bytes):
  try:  # grain DataLoaderIterator takes bytes, dataset iterators a dict
    iterator.set_state(state)
  except (TypeError, AttributeError, ValueError):
    iterator.set_state(json.loads(state.decode()))


def _metric_fn(name):
  return lambda metrics: float((metrics or {}).get(name, -math.inf))


def make_manager(workdir, *, keep: int = 3, best_metric: str = "val/pq", async_save: bool = True,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> ocp.CheckpointManager:
  """A manager over WORKDIR/checkpoints keeping the last `keep` steps and the best by `best_metric`.

  A relative local workdir is taken relative to the current directory (orbax needs absolute paths);
  `timeout_s` also bounds orbax's own waits (its cross-host barriers)."""
  policy = ocm.AnyPreservationPolicy([
      ocm.LatestN(n=keep),
      ocm.BestN(get_metric_fn=_metric_fn(best_metric), n=1),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      best_fn=_metric_fn(best_metric),  # for best_step(); also makes orbax store the metrics
      best_mode="max",
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,  # leftovers of a save killed midway
      create=True,
      async_options=ocp.options.AsyncOptions(timeout_secs=int(math.ceil(timeout_s))),
  )
  return ocp.CheckpointManager(
      epath.Path(paths.absolute(workdir)) / "checkpoints", options=options, item_names=("state", "data"))


def _to_storable(state):
  """Typed PRNG keys are stored as their raw uint32 data."""
  def f(x):
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.key_data(x)
    return x
  return jax.tree.map(f, state)


def _from_storable(stored, template):
  def f(x, t):
    if hasattr(t, "dtype") and jax.dtypes.issubdtype(t.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(x, impl=jax.random.key_impl(t))
    return x
  return jax.tree.map(f, stored, template)


def save(manager, step: int, state, iterator=None, *, metrics=None, wait: bool = False):
  """Saves state (+ the iterator position) at `step`; asynchronous unless `wait`. All processes call it."""
  items = {"state": ocp.args.StandardSave(_to_storable(state))}
  items["data"] = grain.checkpoint.CheckpointSave(
      _IteratorState(_iterator_state(iterator) if iterator is not None else b"{}"))
  manager.save(step, args=ocp.args.Composite(**items), metrics=dict(metrics or {}), force=True)
  if wait:
    manager.wait_until_finished()


def _bounded(fn, timeout_s: float):
  """Runs fn() in a daemon thread for at most timeout_s: (finished, exception or None).

  Daemon: a call stuck in storage (orbax waits on signals that a failed thread never sends) must not
  hang the caller, nor keep the process alive at exit."""
  errors = []

  def target():
    try:
      fn()
    except BaseException as e:  # noqa: BLE001 -- handed to the caller
      errors.append(e)

  thread = threading.Thread(target=target, name="checkpoint_bounded", daemon=True)
  thread.start()
  thread.join(timeout_s)
  return not thread.is_alive(), (errors[0] if errors else None)


def _background_error(manager):
  """The error a failed background save left behind, if orbax has one ready (waits at most 5 s)."""
  _, e = _bounded(manager.check_for_errors, 5.0)
  return f" Its background error: {type(e).__name__}: {e}." if e is not None else ""


def _failed(what, e):
  return SaveError(f"{what} failed: {type(e).__name__}: {e}. Training stops here; the earlier complete "
                   "checkpoints are kept. Fix the cause (permissions, free space) and rerun the same "
                   "command to resume.")


def _hung(manager, what, timeout_s):
  return SaveError(f"{what} did not finish within {timeout_s:.0f} s (stuck or very slow storage?); "
                   f"stopping instead of waiting without end.{_background_error(manager)} The earlier "
                   "complete checkpoints are kept; raise config.train.checkpoint_timeout_s if the "
                   "storage is just slow.")


def wait(manager, timeout_s: float = DEFAULT_TIMEOUT_S, *, what: str = ""):
  """Waits for the pending save at most `timeout_s`; raises SaveError if it failed or is still running."""
  what = what or f"the checkpoint save in {manager.directory}"
  finished, e = _bounded(manager.wait_until_finished, timeout_s)
  if not finished:
    raise _hung(manager, what, timeout_s)
  if e is not None:
    raise _failed(what, e) from e


class Saver:
  """Asynchronous saves that never fail or hang unnoticed.

  `save()` first waits (bounded) for the previous save and raises its error, then issues the new one
  (bounded too: orbax's synchronous part can block forever on a directory it cannot create); `poll()`,
  called at every step, raises as soon as a background save has failed or has run longer than
  `timeout_s`, so training never carries on past a failed save; `finish()` waits for the last one.
  """

  def __init__(self, manager, timeout_s: float = DEFAULT_TIMEOUT_S):
    self.manager, self.timeout_s = manager, float(timeout_s)
    self._pending = None  # (step, time issued) of the save in flight
    self._warned = False

  def _what(self):
    if self._pending is None:
      return "the checkpoint save"
    return f"the save of step {self._pending[0]} ({self.manager.directory / str(self._pending[0])})"

  def save(self, step: int, state, iterator=None, *, metrics=None, wait: bool = False):
    self.finish()
    self._pending = (step, time.monotonic())
    finished, e = _bounded(lambda: save(self.manager, step, state, iterator, metrics=metrics),
                           self.timeout_s)
    if not finished or e is not None:
      what, self._pending = self._what(), None  # reported here: nothing left to wait for
      if not finished:
        raise _hung(self.manager, what, self.timeout_s)
      raise _failed(what, e) from e
    if wait:
      self.finish()

  def poll(self):
    """Cheap, non-blocking: raises SaveError if the save in flight failed or exceeded the timeout."""
    if self._pending is None:
      return
    elapsed = time.monotonic() - self._pending[1]
    if not self.manager.is_saving_in_progress():
      self.finish()  # done: surfaces its error, if any, without waiting
    elif elapsed > self.timeout_s:
      what, self._pending = self._what(), None
      raise SaveError(f"{what} has run for {elapsed:.0f} s, past "
                      f"config.train.checkpoint_timeout_s={self.timeout_s:.0f}; stopping instead of "
                      "training on without a checkpoint. The earlier complete checkpoints are kept."
                      f"{_background_error(self.manager)}")
    elif elapsed > self.timeout_s / 4 and not self._warned:
      self._warned = True
      logging.warning("%s has been running for %.0f s (timeout %.0f s).", self._what(), elapsed,
                      self.timeout_s)

  def finish(self, timeout_s: float | None = None):
    """Waits (bounded) for the save in flight; raises SaveError if it failed or hung."""
    if self._pending is None:
      return
    what = self._what()
    self._pending, self._warned = None, False
    wait(self.manager, self.timeout_s if timeout_s is None else timeout_s, what=what)


def _abstract(x):
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  if isinstance(x, np.ndarray | np.generic):
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
  return x


def _quarantine(manager, step: int):
  """Moves a damaged step directory out of orbax's sight (not deleted: it may be wanted for forensics)."""
  if jax.process_index() == 0:
    src = manager.directory / str(step)
    dst_dir = manager.directory.parent / "corrupted_checkpoints"
    dst_dir.mkdir(parents=True, exist_ok=True)
    if src.exists():
      src.rename(dst_dir / f"{step}-{int(time.time())}")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"quarantine_{step}")
  manager.reload()


def restore(manager, state, iterator=None, *, step: int | None = None):
  """Restores the newest restorable checkpoint (or exactly `step`) into the layout of `state`.

  Returns (state, step), or (None, None) when there is no checkpoint. A step that fails to restore is
  skipped with a warning and the previous one is tried; the failed ones are moved aside once an older
  one restored. If every checkpoint fails (for example the model changed), the newest error is raised:
  starting from scratch over a workdir of checkpoints would be a silent loss.
  """
  manager.reload()
  steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
  if not steps:
    return None, None
  template = _to_storable(state)
  abstract = jax.tree.map(_abstract, template)
  failed, first_error = [], None
  for s in steps:
    holder = _IteratorState()
    items = {"state": ocp.args.StandardRestore(abstract)}
    if iterator is not None:  # evaluation needs no data position (and may run on another process count)
      items["data"] = grain.checkpoint.CheckpointRestore(holder)
    try:
      restored = manager.restore(s, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 -- any damage shows up as some exception from orbax
      logging.warning("Checkpoint at step %d could not be restored (%s: %s); trying the previous one.",
                      s, type(e).__name__, str(e)[:500])
      failed.append(s)
      first_error = first_error or e
      continue
    for f in failed:
      _quarantine(manager, f)
    if iterator is not None and holder.state not in (b"", b"{}"):
      _set_iterator_state(iterator, holder.state)
    return _from_storable(restored["state"], state), s
  raise RuntimeError(
      f"No checkpoint in {manager.directory} could be restored (steps {steps}); the newest failed with "
      f"{type(first_error).__name__}: {first_error}. If the model or config changed, use a new --workdir."
  ) from first_error


def best_step(manager) -> int | None:
  manager.reload()
  return manager.best_step()


def _tuples(x):
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def home(path) -> str:
  """The directory a checkpoint `path` belongs to: the workdir for WORKDIR/checkpoints/STEP, else path.
  That is where its config.json and card live."""
  path = paths.absolute(str(path).rstrip("/"))
  name, parent = os.path.basename(path), os.path.dirname(path)
  if name.isdigit() and os.path.basename(parent) == "checkpoints":
    return os.path.dirname(parent)
  return path


def load_config(path):
  """The config a checkpoint was made with, from its config.json, so that evaluate, predict and export
  need no --config: a training workdir's (the whole config, as training wrote it) or a converted
  checkpoint's (the model config; the rest are the defaults). Raises FileNotFoundError naming the file."""
  file = epath.Path(home(path)) / "config.json"
  if not file.exists():
    raise FileNotFoundError(f"{file} not found: the checkpoint must be a training workdir, a step directory "
                            "in one, or a converted checkpoint (python -m maskformer_jax.convert).")
  stored = _tuples(json.loads(file.read_text()))
  if "source" in stored and set(stored) <= {"model", "source"}:  # a converted checkpoint
    stored = {"model": stored["model"]}
  config = config_lib.base_config()
  with config.unlocked():
    for section, values in stored.items():
      if isinstance(values, dict) and isinstance(config.get(section), ml_collections.ConfigDict):
        config[section].update(values)
      else:
        config[section] = values
  return config


def load_state(config, model, mesh, path, which="latest", shardings=None):
  """(state, step) to evaluate or predict with, from `path`: a training workdir (`which` = 'latest',
  'best' or a step number), a step directory inside one, or a converted checkpoint (step None)."""
  path = paths.absolute(str(path).rstrip("/"))
  if home(path) != path:  # a step directory
    path, which = home(path), os.path.basename(path)
  state = train_step_lib.init_state(config, model, mesh, jax.random.key(config.seed), shardings)
  if "://" not in path and not os.path.isdir(os.path.join(path, "checkpoints")):
    if os.path.exists(os.path.join(path, convert.CONFIG_FILE)):  # a converted checkpoint
      _, variables = convert.load_converted(path)
      return convert.merge_variables(state, variables, what=path), None
    raise SystemExit(f"No checkpoint in {path}: give a training workdir (train first with "
                     "maskformer_jax.train), a step directory in it, or a converted checkpoint.")
  manager = make_manager(path, keep=config.train.keep_checkpoints, best_metric=config.train.best_metric)
  step = None if which == "latest" else (best_step(manager) if which == "best" else int(which))
  state, step = restore(manager, state, step=step)
  if state is None:
    raise SystemExit(f"No checkpoint in {path}/checkpoints: train first (maskformer_jax.train).")
  return state, step
