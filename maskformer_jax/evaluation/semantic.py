"""Semantic evaluator: mIoU, mean accuracy, frequency-weighted IoU, pixel accuracy (in percent).

Predictions (inference.semantic_inference at the original resolution) against the source's label maps;
a panoptic dataset is scored on the semantic maps its panoptic ground truth implies (void -> ignore).
"""
import numpy as np

from maskformer_jax import visualize
from maskformer_jax.data import pipeline
from maskformer_jax.evaluation import common
from maskformer_jax.evaluation.miou import MIoUAccumulator

METRICS = ("miou", "macc", "fwiou", "pixel_acc")


def run(config, ev, state, mesh, eval_step, *, source=None):
  """(row, summary images or None) for the eval entry `ev` of config.evals."""
  source = source or pipeline.make_source(config, common.split(config, ev))
  ignore = config.data.ignore_label
  acc = MIoUAccumulator(num_classes=len(source.categories), ignore_label=ignore)
  summaries = common.Summaries(ev.image_summaries)

  def consume(batch, i, image_id, result):
    gt = source.ground_truth(image_id)
    if isinstance(gt, tuple):  # a panoptic dataset evaluated semantically
      gt = semantic_labels(*gt, ignore_label=ignore)
    acc.add(result, gt)
    summaries.add(lambda: (visualize.original_image(batch, i), visualize.colorize_semantic(gt, ignore),
                           visualize.colorize_semantic(result, ignore)))

  count = common.run_loop(config, ev, state, mesh, eval_step, source, task="semantic", consume=consume)
  result = common.merge_over_processes(acc).result()
  row = {k: 100 * float(v) for k, v in result.items() if np.ndim(v) == 0}
  row["num_images"] = count
  return row, summaries.stacked()


def semantic_labels(id_map, segments_info, ignore_label=255):
  """A panoptic ground truth (contiguous category ids) as a semantic label map; void -> ignore_label."""
  if not segments_info:
    return np.full(np.shape(id_map), ignore_label, np.int32)
  ids = np.array([s["id"] for s in segments_info], np.int64)
  classes = np.array([s["category_id"] for s in segments_info], np.int32)
  order = np.argsort(ids)
  ids, classes = ids[order], classes[order]
  pos = np.minimum(np.searchsorted(ids, id_map), len(ids) - 1)
  return np.where(ids[pos] == id_map, classes[pos], ignore_label).astype(np.int32)
