"""Checkpoint manager: round trip with the iterator position, keep-last-K + best, damaged checkpoints."""
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskformer_jax import checkpoint


def toy_state(seed=0):
  k = jax.random.key(seed)
  return {
      "params": {"w": jax.random.normal(k, (4, 3)), "b": jnp.zeros((3,))},
      "opt_state": {"mu": jnp.ones((4, 3))},
      "step": jnp.asarray(seed, jnp.int32),
      "rng": k,
  }


def toy_iterator():
  ds = grain.MapDataset.range(100).shuffle(seed=3).batch(4)
  return iter(ds.to_iter_dataset())


def assert_trees_equal(a, b):
  a, b = checkpoint._to_storable(a), checkpoint._to_storable(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_with_iterator_state(tmp_path):
  mgr = checkpoint.make_manager(tmp_path, keep=2)
  it = toy_iterator()
  next(it), next(it)
  state = toy_state(1)
  checkpoint.save(mgr, 2, state, it, wait=True)
  expected_next = next(it)

  it2 = toy_iterator()
  restored, step = checkpoint.restore(checkpoint.make_manager(tmp_path), toy_state(0), it2)
  assert step == 2
  assert_trees_equal(restored, state)
  assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(next(it2), expected_next)  # the data resumes where it stopped


def test_no_checkpoint_returns_none(tmp_path):
  assert checkpoint.restore(checkpoint.make_manager(tmp_path), toy_state()) == (None, None)


def test_keeps_last_k_and_best(tmp_path):
  mgr = checkpoint.make_manager(tmp_path, keep=2)
  pqs = {1: 10.0, 2: 40.0, 3: 20.0, 4: None, 5: 5.0, 6: None}
  for s, pq in pqs.items():
    checkpoint.save(mgr, s, toy_state(s), metrics=None if pq is None else {"val/pq": pq})
  mgr.wait_until_finished()
  mgr.reload()
  assert sorted(mgr.all_steps()) == [2, 5, 6]  # last two + the best (step 2, PQ 40)
  assert checkpoint.best_step(mgr) == 2
  restored, step = checkpoint.restore(mgr, toy_state(), step=checkpoint.best_step(mgr))
  assert step == 2
  assert_trees_equal(restored, toy_state(2))


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_newest_falls_back_to_previous(tmp_path, damage, caplog):
  mgr = checkpoint.make_manager(tmp_path, keep=3)
  for s in (1, 2):
    checkpoint.save(mgr, s, toy_state(s), wait=True)
  files = [p for p in (tmp_path / "checkpoints" / "2" / "state").rglob("*") if p.is_file()]
  data_files = sorted((p for p in files if p.stat().st_size > 0), key=lambda p: -p.stat().st_size)
  assert data_files
  for p in data_files:  # damage every non-empty file of the state item
    if damage == "truncate":
      p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    else:
      p.unlink()

  with caplog.at_level("WARNING"):
    restored, step = checkpoint.restore(checkpoint.make_manager(tmp_path), toy_state())
  assert step == 1
  assert_trees_equal(restored, toy_state(1))
  assert any("step 2 could not be restored" in r.getMessage() for r in caplog.records)
  assert (tmp_path / "corrupted_checkpoints").exists()
  assert not (tmp_path / "checkpoints" / "2").exists()
  # A later save of the same step is then possible (training continues from step 1).
  mgr = checkpoint.make_manager(tmp_path, keep=3)
  checkpoint.save(mgr, 2, toy_state(7), wait=True)
  assert checkpoint.restore(mgr, toy_state())[1] == 2


def test_incomplete_save_is_ignored(tmp_path):
  mgr = checkpoint.make_manager(tmp_path, keep=3)
  checkpoint.save(mgr, 1, toy_state(1), wait=True)
  # What a save killed midway leaves: orbax's temporary directory, never renamed to its final name.
  tmp = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-123"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "garbage").write_bytes(b"\0" * 10)
  restored, step = checkpoint.restore(checkpoint.make_manager(tmp_path), toy_state())
  assert step == 1
  assert_trees_equal(restored, toy_state(1))


def test_all_checkpoints_unrestorable_raises(tmp_path):
  mgr = checkpoint.make_manager(tmp_path, keep=3)
  checkpoint.save(mgr, 1, toy_state(1), wait=True)
  wrong = {"params": {"other": jnp.zeros((2,))}}  # a model that changed under the workdir
  with pytest.raises(RuntimeError, match="new --workdir"):
    checkpoint.restore(checkpoint.make_manager(tmp_path), wrong)
  assert (tmp_path / "checkpoints" / "1").exists()  # nothing moved aside


# ------------------------------------------------------------------------------------------------
# Failed and hung saves: they stop the caller with the path and the cause, never silently.

def poll_until_error(saver, timeout=60.0):
  import time
  t = time.time()
  while time.time() - t < timeout:
    saver.poll()
    time.sleep(0.05)
  raise AssertionError("the failed save was never reported")


def test_relative_workdir_is_resolved_against_the_current_directory(tmp_path, monkeypatch):
  """orbax 0.12 refuses relative paths; a user's `--workdir runs/demo` must still work."""
  monkeypatch.chdir(tmp_path)
  mgr = checkpoint.make_manager("runs/rel", keep=2)
  saver = checkpoint.Saver(mgr, timeout_s=60)
  saver.save(3, toy_state(3), wait=True)
  assert (tmp_path / "runs" / "rel" / "checkpoints" / "3").is_dir()
  restored, step = checkpoint.restore(checkpoint.make_manager("runs/rel"), toy_state(0))
  assert step == 3
  assert_trees_equal(restored, toy_state(3))


def test_failed_background_save_raises_with_path_and_cause_and_keeps_earlier(tmp_path, monkeypatch):
  """A library error inside orbax's background write (here: a full disk) surfaces at the next poll."""
  from orbax.checkpoint._src.serialization import tensorstore_utils
  mgr = checkpoint.make_manager(tmp_path, keep=1)
  saver = checkpoint.Saver(mgr, timeout_s=60)
  saver.save(1, toy_state(1), wait=True)

  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(tensorstore_utils, "build_array_write_spec", full_disk)
  with pytest.raises(checkpoint.SaveError) as e:
    saver.save(2, toy_state(2))
    poll_until_error(saver)
  message = str(e.value)
  assert "No space left on device" in message and str(tmp_path / "checkpoints" / "2") in message
  monkeypatch.undo()
  # The earlier complete checkpoint survived (keep=1 did not delete it for the failed one) and restores.
  restored, step = checkpoint.restore(checkpoint.make_manager(tmp_path, keep=1), toy_state(0))
  assert step == 1
  assert_trees_equal(restored, toy_state(1))
  # Once the cause is gone, the rerun (a new manager, as in a new process) saves again.
  checkpoint.Saver(checkpoint.make_manager(tmp_path, keep=1), timeout_s=60).save(3, toy_state(3), wait=True)
  assert checkpoint.restore(checkpoint.make_manager(tmp_path), toy_state(0))[1] == 3


def test_hung_save_is_bounded(tmp_path, monkeypatch):
  """A save that never finishes stops the caller after the timeout instead of hanging it."""
  import threading
  import time
  mgr = checkpoint.make_manager(tmp_path, keep=2)
  saver = checkpoint.Saver(mgr, timeout_s=1.0)
  saver.save(1, toy_state(1), wait=True)
  release = threading.Event()
  monkeypatch.setattr(mgr, "wait_until_finished", lambda: release.wait(120))
  monkeypatch.setattr(mgr, "is_saving_in_progress", lambda: not release.is_set())
  saver._pending = (2, time.monotonic())  # as if step 2 had been issued and got stuck in storage
  t = time.time()
  with pytest.raises(checkpoint.SaveError, match="past config.train.checkpoint_timeout_s=1"):
    poll_until_error(saver, timeout=30)
  with pytest.raises(checkpoint.SaveError, match="did not finish within 1 s"):
    saver._pending = (2, time.monotonic())
    saver.finish()
  assert time.time() - t < 10
  release.set()
