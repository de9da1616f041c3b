"""Evaluate COCO-format panoptic predictions like panopticapi's `pq_compute`, but fast.

  python -m maskformer_jax.tools.pq_compute --gt-json F --gt-dir D --pred-json F --pred-dir D [--out r.json]

Same numbers as panopticapi (the rules are in `maskformer_jax.evaluation.pq`), reported as fractions in
[0, 1]: keys All / Things / Stuff with pq, sq, rq, n, and per_class {category_id: {pq, sq, rq}}. The table
printed is in percent like panopticapi's. Every ground-truth image needs a prediction (panopticapi raises
otherwise); a prediction for an image without ground truth is ignored, as there.
"""
import argparse
import json
import multiprocessing
import os
import sys
import time

import numpy as np
from PIL import Image

from maskformer_jax.evaluation.pq import PQAccumulator


def read_id_png(path):
  """COCO panoptic PNG -> uint32 id map (R + 256 G + 256^2 B).

  OpenCV decodes a little faster than PIL, and BGR -> RGBA with alpha zeroed, viewed as little-endian
  uint32, IS the id map: one pass instead of three shifted conversions. PIL for anything not 8-bit BGR."""
  try:
    import cv2
    bgr = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  except ImportError:
    bgr = None
  if bgr is not None and bgr.ndim == 3 and bgr.shape[2] == 3 and bgr.dtype == np.uint8:
    rgba = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGBA)
    rgba[..., 3] = 0
    return rgba.view("<u4")[..., 0]
  with Image.open(path) as im:
    rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
  ids = rgb[..., 0].astype(np.uint32)
  ids |= rgb[..., 1].astype(np.uint32) << 8
  ids |= rgb[..., 2].astype(np.uint32) << 16
  return ids


def _pairs(gt, pred):
  pred_by_image = {a["image_id"]: a for a in pred["annotations"]}
  pairs = []
  for gt_ann in gt["annotations"]:
    if gt_ann["image_id"] not in pred_by_image:
      raise KeyError(f"no prediction for the image with id {gt_ann['image_id']}")
    pairs.append((gt_ann, pred_by_image[gt_ann["image_id"]]))
  return pairs


def _evaluate_chunk(args):
  categories, pairs, gt_dir, pred_dir = args
  acc = PQAccumulator(categories)
  for gt_ann, pred_ann in pairs:
    gt_map = read_id_png(os.path.join(gt_dir, gt_ann["file_name"]))
    pred_map = read_id_png(os.path.join(pred_dir, pred_ann["file_name"]))
    acc.add(pred_map, pred_ann["segments_info"], gt_map, gt_ann["segments_info"])
  return acc.state()


def pq_compute(gt_json_file, gt_dir, pred_json_file, pred_dir, workers: int = 1) -> dict:
  """The metric over a whole prediction set; workers > 1 splits the images over processes."""
  with open(gt_json_file) as f:
    gt = json.load(f)
  with open(pred_json_file) as f:
    pred = json.load(f)
  categories = gt["categories"]
  pairs = _pairs(gt, pred)
  acc = PQAccumulator(categories)
  workers = max(1, min(int(workers), len(pairs)))
  chunks = [(categories, pairs[i::workers], gt_dir, pred_dir) for i in range(workers)]
  if workers == 1:
    states = [_evaluate_chunk(chunks[0])]
  else:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      states = pool.map(_evaluate_chunk, chunks)
  acc.merge(np.stack(states))
  return acc.result()


def format_table(result: dict) -> str:
  lines = [f"{'':10s}| {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'N':>5s}", "-" * 38]
  for name in ("All", "Things", "Stuff"):
    r = result[name]
    lines.append(f"{name:10s}| {100 * r['pq']:6.2f} {100 * r['sq']:6.2f} {100 * r['rq']:6.2f} {r['n']:5d}")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gt-json", required=True)
  p.add_argument("--gt-dir", required=True)
  p.add_argument("--pred-json", required=True)
  p.add_argument("--pred-dir", required=True)
  p.add_argument("--out", default="", help="write the result as JSON here")
  p.add_argument("--workers", type=int, default=1, help="processes to read and evaluate images")
  args = p.parse_args(argv)
  start = time.time()
  result = pq_compute(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir, workers=args.workers)
  print(format_table(result))
  print(f"time: {time.time() - start:.2f} s", file=sys.stderr)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(result, per_class={str(k): v for k, v in result["per_class"].items()}), f, indent=1)
  return result


if __name__ == "__main__":
  main()
