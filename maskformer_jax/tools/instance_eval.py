"""Score COCO-format instance segmentation predictions with COCO mask AP (pycocotools' COCOeval, segm).

  python -m maskformer_jax.tools.instance_eval --gt instances_val2017.json --pred PRED.json [--out r.json]
  python -m maskformer_jax.tools.instance_eval --panoptic-gt panoptic_val2017.json \\
      --panoptic-gt-dir panoptic_val2017 --pred PRED.json [--out r.json]

PRED.json is a list of {image_id, category_id, segmentation (RLE: {size, counts}), score} with the
dataset's own category ids. The ground truth is a COCO instance annotation file, or a COCO panoptic one
turned into instance annotations as the instance evaluator does (thing segments, crowd kept as iscrowd;
evaluation.mask_ap). Reported in percent: ap, ap50, ap75, aps, apm, apl (NaN where an area range has no
ground truth), num_images, num_detections. Bad input (a missing or unreadable file, malformed JSON, a
missing field, an unknown image or category id, a mask of the wrong size) stops with an error naming the
file, the entry and the field.
"""
import argparse
import json
import math
import os
import sys
import time

from maskformer_jax.evaluation import mask_ap


class InputError(ValueError):
  """Input that cannot be scored; the message names the file and what is wrong in it."""


def load_json(path, what):
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise InputError(f"{what} {path}: cannot read it ({type(e).__name__}: {e.strerror or e})") from None
  except ValueError as e:
    raise InputError(f"{what} {path}: not valid JSON ({e})") from None


def _field(entry, key, kinds, where):
  if not isinstance(entry, dict):
    raise InputError(f"{where}: expected an object, got {type(entry).__name__}")
  if key not in entry:
    raise InputError(f"{where}: missing field {key!r}")
  value = entry[key]
  if not isinstance(value, kinds) or isinstance(value, bool):
    raise InputError(f"{where}: field {key!r} = {value!r} is not {' or '.join(k.__name__ for k in kinds)}")
  return value


def _list(data, key, path):
  if not isinstance(data, dict) or not isinstance(data.get(key), list):
    raise InputError(f"{path}: expected a COCO file with a list {key!r}")
  return data[key]


def _images_and_categories(data, path):
  images = []
  for i, im in enumerate(_list(data, "images", path)):
    where = f"{path}: images[{i}]"
    images.append({k: _field(im, k, (int,), where) for k in ("id", "height", "width")})
  categories = []
  for i, c in enumerate(_list(data, "categories", path)):
    cid = _field(c, "id", (int,), f"{path}: categories[{i}]")
    categories.append({"id": cid, "name": c.get("name", str(cid)), "isthing": int(c.get("isthing", 1))})
  return images, categories


def load_instance_gt(path):
  """(images, thing categories, annotations) of a COCO instance annotation file, checked."""
  data = load_json(path, "ground truth")
  images, categories = _images_and_categories(data, path)
  image_ids, cat_ids = {im["id"] for im in images}, {c["id"] for c in categories}
  annotations = []
  for i, a in enumerate(_list(data, "annotations", path)):
    where = f"{path}: annotations[{i}]"
    if _field(a, "image_id", (int,), where) not in image_ids:
      raise InputError(f"{where}: image_id {a['image_id']} is not in 'images'")
    if _field(a, "category_id", (int,), where) not in cat_ids:
      raise InputError(f"{where}: category_id {a['category_id']} is not in 'categories'")
    _field(a, "segmentation", (dict, list), where)
    _field(a, "area", (int, float), where)
    annotations.append(a)
  return images, categories, annotations


def load_panoptic_gt(path, png_dir):
  """(images, thing categories, annotations) built from a COCO panoptic ground truth (JSON + PNGs)."""
  from maskformer_jax.tools.pq_compute import BadPNGError, read_id_png
  data = load_json(path, "panoptic ground truth")
  images, categories = _images_and_categories(data, path)
  by_id = {im["id"]: im for im in images}
  known = {c["id"] for c in categories}
  thing_ids = {c["id"] for c in categories if c["isthing"]}
  annotations, seen = [], []
  for i, a in enumerate(_list(data, "annotations", path)):
    where = f"{path}: annotations[{i}]"
    image_id = _field(a, "image_id", (int,), where)
    if image_id not in by_id:
      raise InputError(f"{where}: image_id {image_id} is not in 'images'")
    png = os.path.join(png_dir, _field(a, "file_name", (str,), where))
    segments = _field(a, "segments_info", (list,), where)
    for j, s in enumerate(segments):
      _field(s, "id", (int,), f"{where}.segments_info[{j}]")
      if _field(s, "category_id", (int,), f"{where}.segments_info[{j}]") not in known:
        raise InputError(f"{where}.segments_info[{j}]: category_id {s['category_id']} is not in 'categories'")
    try:
      id_map = read_id_png(png)
    except BadPNGError as e:
      raise InputError(f"{where}: {e}") from None
    im = by_id[image_id]
    if id_map.shape != (im["height"], im["width"]):
      raise InputError(f"{png}: size {id_map.shape} differs from images entry {image_id} "
                       f"({im['height']}, {im['width']}) in {path}")
    annotations += mask_ap.instances_from_panoptic(image_id, id_map, segments, thing_ids)
    seen.append(by_id[image_id])
  return seen, [c for c in categories if c["isthing"]], annotations


def load_predictions(path, images, categories):
  """The predictions of `path`, checked against the ground truth's images and (thing) categories."""
  data = load_json(path, "predictions")
  if not isinstance(data, list):
    raise InputError(f"{path}: expected a list of {{image_id, category_id, segmentation, score}}, "
                     f"got {type(data).__name__}")
  sizes = {im["id"]: [im["height"], im["width"]] for im in images}
  cat_ids = {c["id"] for c in categories}
  for i, p in enumerate(data):
    where = f"{path}: [{i}]"
    image_id = _field(p, "image_id", (int,), where)
    if image_id not in sizes:
      raise InputError(f"{where}: image_id {image_id} is not an image of the ground truth")
    if _field(p, "category_id", (int,), where) not in cat_ids:
      raise InputError(f"{where}: category_id {p['category_id']} is not a scored category of the ground "
                       f"truth ({sorted(cat_ids)})")
    score = _field(p, "score", (int, float), where)
    if not math.isfinite(score):
      raise InputError(f"{where}: field 'score' = {score!r} is not finite")
    rle = _field(p, "segmentation", (dict,), where)
    _field(rle, "counts", (str, list), f"{where}.segmentation")
    if list(_field(rle, "size", (list,), f"{where}.segmentation")) != sizes[image_id]:
      raise InputError(f"{where}: segmentation size {rle['size']} is not the image's (height, width) "
                       f"{sizes[image_id]}")
  return data


def instance_eval(pred_json, gt_json="", panoptic_gt_json="", panoptic_gt_dir="") -> dict:
  """The row {ap, ap50, ap75, aps, apm, apl (percent), num_images, num_detections} for the predictions
  against instance annotations (gt_json) or a panoptic ground truth (panoptic_gt_json + _dir)."""
  if bool(gt_json) == bool(panoptic_gt_json):
    raise InputError("give either --gt (COCO instances) or --panoptic-gt with --panoptic-gt-dir")
  if gt_json:
    images, categories, annotations = load_instance_gt(gt_json)
    categories = [c for c in categories if c["isthing"]]
  else:
    if not panoptic_gt_dir:
      raise InputError("--panoptic-gt needs --panoptic-gt-dir (the directory of its PNGs)")
    images, categories, annotations = load_panoptic_gt(panoptic_gt_json, panoptic_gt_dir)
  results = load_predictions(pred_json, images, categories)
  stats = mask_ap.coco_eval_stats(images, categories, annotations, results)
  return dict(mask_ap.metric_row(stats), num_images=len(images), num_detections=len(results))


def format_table(row: dict) -> str:
  names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
  return ("  ".join(f"{n:>6s}" for n in names) + "\n"
          + "  ".join(f"{row[k]:6.2f}" for k in mask_ap.METRICS))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pred", required=True, help="COCO results JSON (a list of RLE detections)")
  p.add_argument("--gt", default="", help="COCO instance annotation JSON")
  p.add_argument("--panoptic-gt", default="", help="COCO panoptic JSON (instead of --gt)")
  p.add_argument("--panoptic-gt-dir", default="", help="the PNG directory of --panoptic-gt")
  p.add_argument("--out", default="", help="write the result as JSON here")
  args = p.parse_args(argv)
  start = time.time()
  try:
    row = instance_eval(args.pred, args.gt, args.panoptic_gt, args.panoptic_gt_dir)
  except InputError as e:
    raise SystemExit(f"instance_eval: error: {e}") from None
  print(format_table(row))
  print(f"{row['num_images']} images, {row['num_detections']} detections; time: {time.time() - start:.2f} s",
        file=sys.stderr)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(row, f, indent=1)
  return row


if __name__ == "__main__":
  main()
