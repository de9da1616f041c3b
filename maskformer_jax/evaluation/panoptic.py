"""Panoptic evaluator: PQ, SQ, RQ over all classes, things and stuff, and PQ per class (in percent).

Predictions (inference.panoptic_inference at the original resolution) are scored against the source's
panoptic ground truth with PQAccumulator, the COCO panoptic metric (docs/reference.md section 4).
"""
from maskformer_jax import visualize
from maskformer_jax.data import pipeline
from maskformer_jax.evaluation import common
from maskformer_jax.evaluation.pq import PQAccumulator

METRICS = ("pq", "sq", "rq", "pq_th", "sq_th", "rq_th", "pq_st", "sq_st", "rq_st")


def run(config, ev, state, mesh, eval_step, *, source=None):
  """(row, summary images or None) for the eval entry `ev` of config.evals."""
  source = source or pipeline.make_source(config, common.split(config, ev))
  categories = source.categories
  acc, summaries = PQAccumulator(categories), common.Summaries(ev.image_summaries)

  def consume(batch, i, image_id, result):
    id_map, segments_info = source.ground_truth(image_id)
    gt = (id_map, original_category_ids(segments_info, categories))
    acc.add(result[0], result[1], gt[0], gt[1])
    summaries.add(lambda: (visualize.original_image(batch, i), visualize.colorize(*gt, categories),
                           visualize.colorize(*result, categories)))

  count = common.run_loop(config, ev, state, mesh, eval_step, source, task="panoptic", consume=consume)
  row = metric_row(common.merge_over_processes(acc).result())
  row["num_images"] = count
  return row, summaries.stacked()


def original_category_ids(segments_info, categories):
  """Ground truth from the sources names contiguous classes; predictions and PQ use the dataset's ids."""
  to_id = {c["contiguous_id"]: c["id"] for c in categories}
  return [{**s, "category_id": to_id[s["category_id"]]} for s in segments_info]


def metric_row(result: dict) -> dict:
  """PQAccumulator.result() as a flat row in percent: pq/sq/rq (+ _th, _st) and pq_class<id>."""
  row = {}
  for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
    for k in ("pq", "sq", "rq"):
      row[k + suffix] = 100 * float(result[group][k])
  for cat, r in result.get("per_class", {}).items():
    row[f"pq_class{cat}"] = 100 * float(r["pq"])
  return row
