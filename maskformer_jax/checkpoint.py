"""Orbax checkpoints of the train state together with the data iterator state.

One step directory holds `state` (the plain-dict train state, written asynchronously, every process
writing its shards) and `data` (each process's grain iterator state), so a resumed run sees exactly the
batches the uninterrupted run would have seen. Orbax writes into a temporary directory and renames it
when complete, so a run killed mid-save (even SIGKILL) leaves only complete checkpoints behind; a
checkpoint that is damaged afterwards (a truncated or deleted file) makes `restore` fall back to the
previous one with a warning, and moves the damaged one aside to `WORKDIR/corrupted_checkpoints/`.

Kept: the last `keep` steps plus the best by the evaluation metric (`pq` or `miou`), which the train
loop attaches to the checkpoints it saves right after an evaluation.
"""
import json
import math
import time

from absl import logging
from etils import epath
import grain.checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm


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


def make_manager(workdir, *, keep: int = 3, best_metric: str = "pq",
                 async_save: bool = True) -> ocp.CheckpointManager:
  """A manager over WORKDIR/checkpoints keeping the last `keep` steps and the best by `best_metric`."""
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
  )
  return ocp.CheckpointManager(
      epath.Path(workdir) / "checkpoints", options=options, item_names=("state", "data"))


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
    from jax.experimental import multihost_utils
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
    try:
      restored = manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          data=grain.checkpoint.CheckpointRestore(holder)))
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
