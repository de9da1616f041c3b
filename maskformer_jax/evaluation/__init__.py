"""Host-side dataset-level metrics (PQ, mIoU) whose states sum across hosts."""
from maskformer_jax.evaluation.miou import MIoUAccumulator
from maskformer_jax.evaluation.pq import PQAccumulator, id2rgb, rgb2id

__all__ = ["MIoUAccumulator", "PQAccumulator", "id2rgb", "rgb2id"]
