"""COCO mask AP: instance ground truth from panoptic maps, RLE detections, pycocotools' COCOeval (segm).

The numbers are pycocotools' own (COCOeval with iouType "segm", its default parameters: IoU 0.50:0.95,
100 detections per image, the COCO area ranges), so they are comparable with any COCO instance result.
A panoptic ground truth becomes instance annotations shaped like COCO's instance file (which is what
Mask2Former scores against on COCO panoptic; docs/reference.md section 4): thing segments only, a crowd
segment kept with iscrowd 1 (COCOeval ignores detections that fall on it instead of counting them as
false positives), area = the mask's pixel count, bbox = the mask's extent.

Host side: every process collects its own images (`MaskAPAccumulator.add`); `gathered()` brings all
processes' lists to every process, so the metric is the dataset-level one whatever the sharding.
"""
import contextlib
import copy
import io
import pickle

import jax
from jax.experimental import multihost_utils
import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRICS = ("ap", "ap50", "ap75", "aps", "apm", "apl")  # COCOeval.stats[0:6], in percent
_GATHER_CHUNK = 1 << 26  # bytes per process and allgather: bounds the memory a gather needs


def encode(mask) -> dict:
  """Binary mask [h, w] -> COCO compressed RLE {size, counts (str, JSON-ready)}."""
  rle = mask_util.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
  return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def bbox_of(mask) -> list:
  """COCO [x, y, width, height] of the pixels of a non-empty mask."""
  ys, xs = np.nonzero(mask)
  return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def instances_from_panoptic(image_id: int, id_map, segments_info, thing_ids) -> list[dict]:
  """COCO instance annotations (no "id" yet) of one panoptic ground truth.

  segments_info carries the dataset's category ids (those in `thing_ids` are things); stuff segments are
  dropped, crowd ones kept with iscrowd 1, and a listed segment with no pixel is skipped (it could be
  neither matched nor ignored). Area and bbox come from the map, not from the JSON.
  """
  thing_ids = {int(t) for t in thing_ids}
  out = []
  for s in segments_info:
    if int(s["category_id"]) not in thing_ids:
      continue
    mask = np.asarray(id_map) == int(s["id"])
    area = int(mask.sum())
    if not area:
      continue
    out.append({"image_id": int(image_id), "category_id": int(s["category_id"]),
                "iscrowd": int(s.get("iscrowd", 0)), "area": area, "bbox": bbox_of(mask),
                "segmentation": encode(mask)})
  return out


def detections(image_id: int, masks, scores, category_ids) -> list[dict]:
  """COCO results of one image's instance predictions (inference.postprocess_to_original, task
  "instance"): every entry is kept, empty masks too, as Mask2Former's instance inference keeps its
  top-k; COCOeval keeps the 100 best-scored per image."""
  return [{"image_id": int(image_id), "category_id": int(c), "segmentation": encode(m), "score": float(s)}
          for m, s, c in zip(masks, scores, category_ids)]


def coco_eval_stats(images, categories, annotations, results) -> np.ndarray:
  """COCOeval(iouType="segm").stats (12 numbers, fractions; -1 where a range has no ground truth).

  images: [{id, height, width}]; categories: [{id, ...}] (the thing classes); annotations: COCO
  instance annotations (ids are assigned here when missing); results: [{image_id, category_id,
  segmentation, score}]. pycocotools prints its progress; it is kept off stdout.
  """
  gt = COCO()
  anns = [dict(a, id=a.get("id", i + 1)) for i, a in enumerate(annotations)]
  gt.dataset = {"images": list(images), "categories": list(categories), "annotations": anns}
  with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
    if results:
      # Without a bbox, loadRes derives area and bbox from the mask (detectron2 drops the bbox too).
      dt = gt.loadRes([{k: v for k, v in r.items() if k != "bbox"} for r in results])
    else:  # loadRes rejects an empty list; no detection at all scores 0 wherever there is ground truth
      dt = COCO()
      dt.dataset = {"images": list(images), "categories": list(categories), "annotations": []}
      dt.createIndex()
    ev = COCOeval(gt, dt, iouType="segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return np.asarray(ev.stats, np.float64)


def metric_row(stats) -> dict:
  """stats[0:6] as {ap, ap50, ap75, aps, apm, apl} in percent; NaN where COCOeval has no ground truth to
  score (its -1), as detectron2 reports it."""
  return {k: 100 * float(v) if v >= 0 else float("nan") for k, v in zip(METRICS, stats[:6])}


class MaskAPAccumulator:
  """The images, ground truth and detections of an evaluation, as lists that gather across hosts.

  categories: the dataset's list of {id, isthing, ...}; only thing classes are scored.
  """

  def __init__(self, categories):
    self.categories = [{"id": int(c["id"]), "name": c.get("name", str(c["id"]))}
                       for c in categories if c.get("isthing", 1)]
    self.thing_ids = {c["id"] for c in self.categories}
    self.images, self.annotations, self.results = [], [], []

  def add(self, image_id, id_map, segments_info, masks, scores, category_ids):
    """One image: its panoptic ground truth (dataset category ids) and its instance predictions."""
    h, w = np.shape(id_map)
    self.images.append({"id": int(image_id), "height": int(h), "width": int(w)})
    self.annotations += instances_from_panoptic(image_id, id_map, segments_info, self.thing_ids)
    self.results += detections(image_id, masks, scores, category_ids)

  def add_instances(self, image_id, size, annotations, masks, scores, category_ids):
    """One image: its COCO instance annotations (dataset category ids; crowd ones included) and its
    instance predictions."""
    self.images.append({"id": int(image_id), "height": int(size[0]), "width": int(size[1])})
    self.annotations += [a for a in annotations if int(a["category_id"]) in self.thing_ids]
    self.results += detections(image_id, masks, scores, category_ids)

  def gathered(self) -> "MaskAPAccumulator":
    """Every process's images, in image-id order (so the result is the single-process one)."""
    parts = allgather_objects((self.images, self.annotations, self.results))
    out = copy.copy(self)
    by_id = lambda x: x["image_id"]  # noqa: E731 -- stable: an image's entries keep their order
    out.images = sorted((i for p in parts for i in p[0]), key=lambda x: x["id"])
    out.annotations = sorted((a for p in parts for a in p[1]), key=by_id)
    out.results = sorted((r for p in parts for r in p[2]), key=by_id)
    return out

  def stats(self) -> np.ndarray:
    return coco_eval_stats(self.images, self.categories, self.annotations, self.results)

  def result(self) -> dict:
    return metric_row(self.stats())


def allgather_objects(obj) -> list:
  """`obj` of every process, in process order, on every process.

  Pickled bytes travel as uint8 through process_allgather (as sum_across_hosts' states do), padded to the
  longest process's length and sent in chunks so no single transfer exceeds _GATHER_CHUNK per process.
  """
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
  longest, parts = int(sizes.max()), []
  for start in range(0, longest, _GATHER_CHUNK):
    piece = np.zeros(min(_GATHER_CHUNK, longest - start), np.uint8)
    mine = data[start:start + piece.size]
    piece[:mine.size] = mine
    parts.append(np.asarray(multihost_utils.process_allgather(piece)).reshape(len(sizes), -1))
  joined = np.concatenate(parts, axis=1)
  return [pickle.loads(joined[p, :int(n)].tobytes()) for p, n in enumerate(sizes)]
