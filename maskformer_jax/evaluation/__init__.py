"""Host-side dataset-level metrics (PQ, mIoU) whose states sum across hosts.

Eval loop, every host: `acc.add(...)` for its own images, then
`total = PQAccumulator(categories); total.merge(sum_across_hosts(acc.state())); total.result()`.
"""
import jax
from jax.experimental import multihost_utils
import numpy as np

from maskformer_jax.evaluation.miou import MIoUAccumulator
from maskformer_jax.evaluation.pq import PQAccumulator, id2rgb, rgb2id

__all__ = ["MIoUAccumulator", "PQAccumulator", "id2rgb", "rgb2id", "sum_across_hosts"]


def sum_across_hosts(state: np.ndarray) -> np.ndarray:
  """Sum a numpy state over all JAX processes, bit-exactly.

  process_allgather goes through jax arrays, which without jax_enable_x64 would turn float64/int64 into
  32-bit; the state therefore travels as raw bytes and is summed in its own dtype on every host."""
  state = np.ascontiguousarray(state)
  if jax.process_count() == 1:
    return state.copy()
  raw = np.frombuffer(state.tobytes(), np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(raw))  # [processes, nbytes]
  return _from_bytes(gathered, state.dtype, state.shape).sum(0)


def _from_bytes(gathered, dtype, shape):
  return np.ascontiguousarray(gathered).view(dtype).reshape((-1,) + tuple(shape))
