"""Instance evaluator: COCO mask AP, AP50, AP75, APs, APm, APl (in percent) by pycocotools' COCOeval.

Predictions (inference.instance_inference at the original resolution: top-k over queries x classes,
thing classes only on a panoptic dataset) are scored against the source's instance annotations (the
coco_instance source: the instances JSON's own, crowd included, as COCOeval reads the file) or against
instance annotations derived from its panoptic ground truth (evaluation.mask_ap, docs/reference.md
section 4). Every process evaluates its shard; the lists are gathered so that every process computes
the dataset-level AP.
"""
import numpy as np
from pycocotools import mask as mask_util

from maskformer_jax import visualize
from maskformer_jax.data import pipeline
from maskformer_jax.evaluation import common
from maskformer_jax.evaluation.mask_ap import METRICS, MaskAPAccumulator
from maskformer_jax.evaluation.panoptic import original_category_ids

__all__ = ["METRICS", "run"]
SUMMARY_SCORE = 0.5  # detections drawn in the image summaries (the metric uses all of them)


def run(config, ev, state, mesh, eval_step, *, source=None):
  """(row, summary images or None) for the eval entry `ev` of config.evals."""
  source = source or pipeline.make_source(config, common.split(config, ev))
  categories = source.categories
  acc, summaries = MaskAPAccumulator(categories), common.Summaries(ev.image_summaries)

  def consume(batch, i, image_id, result):
    if hasattr(source, "instance_annotations"):  # an instance dataset: its annotations as they are
      size, annotations = source.instance_annotations(image_id)
      acc.add_instances(image_id, size, annotations, result["masks"], result["scores"],
                        result["category_id"])
      truth = lambda: annotations_id_map(annotations, size)  # noqa: E731
    else:
      id_map, segments_info = source.ground_truth(image_id)
      segments_info = original_category_ids(segments_info, categories)
      acc.add(image_id, id_map, segments_info, result["masks"], result["scores"], result["category_id"])
      size = id_map.shape
      truth = lambda: things_only(id_map, segments_info, acc.thing_ids)  # noqa: E731
    summaries.add(lambda: (visualize.original_image(batch, i), visualize.colorize(*truth(), categories),
                           visualize.colorize(*as_id_map(result, size), categories)))

  count = common.run_loop(config, ev, state, mesh, eval_step, source, task="instance", consume=consume)
  row = acc.gathered().result()
  row["num_images"] = count
  return row, summaries.stacked()


def things_only(id_map, segments_info, thing_ids):
  """The panoptic ground truth with stuff segments made void (what the metric scores)."""
  keep = [s for s in segments_info if s["category_id"] in thing_ids]
  ids = np.array([s["id"] for s in keep], np.int64)
  return np.where(np.isin(id_map, ids), id_map, 0), keep


def annotations_id_map(annotations, shape):
  """Instance annotations painted largest first (the smaller, often in front, on top), as an id map."""
  id_map, info = np.zeros(shape, np.int32), []
  for n, a in enumerate(sorted(annotations, key=lambda a: -a["area"])):
    id_map[mask_util.decode(dict(a["segmentation"], counts=a["segmentation"]["counts"].encode())) > 0] = n + 1
    info.append({"id": n + 1, "category_id": int(a["category_id"])})
  return id_map, info


def as_id_map(result, shape, min_score=SUMMARY_SCORE):
  """Detections scoring >= min_score painted lowest score first (the best on top), as an id map."""
  id_map, info = np.zeros(shape, np.int32), []
  order = np.argsort(result["scores"], kind="stable")
  for n, k in enumerate(order[result["scores"][order] >= min_score]):
    id_map[result["masks"][k]] = n + 1
    info.append({"id": n + 1, "category_id": int(result["category_id"][k])})
  return id_map, info
