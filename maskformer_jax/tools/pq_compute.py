"""Evaluate COCO-format panoptic predictions like panopticapi's `pq_compute`, but fast.

  python -m maskformer_jax.tools.pq_compute --gt-json F --gt-dir D --pred-json F --pred-dir D [--out r.json]

Same numbers as panopticapi (the rules are in `maskformer_jax.evaluation.pq`), reported as fractions in
[0, 1]: keys All / Things / Stuff with pq, sq, rq, n, and per_class {category_id: {pq, sq, rq}}. The table
printed is in percent like panopticapi's. Every ground-truth image needs a prediction (panopticapi raises
otherwise); a prediction for an image without ground truth is ignored, as there.

A bad PNG (missing, empty, truncated, of the wrong size) raises an error naming the file and the problem;
with --bad-input skip it is logged to stderr and listed under "bad_input" in the result (and --out), a bad
prediction scored as an empty prediction (its ground-truth segments false negatives: never dropped, which
would inflate PQ) and a bad ground truth leaving its image out.
"""
import argparse
import io
import json
import multiprocessing
import os
import sys
import time

import numpy as np
from PIL import Image

from maskformer_jax.data.coco_panoptic import describe
from maskformer_jax.evaluation.pq import PQAccumulator


class BadPNGError(ValueError):
  """A prediction or ground-truth PNG that cannot be used; the message names the file and the problem."""

  def __init__(self, path, problem):
    super().__init__(f"{path}: {problem}")
    self.path, self.problem = str(path), problem

  def __reduce__(self):  # raised in a worker process, re-raised in the parent
    return type(self), (self.path, self.problem)


def read_id_png(path):
  """COCO panoptic PNG -> uint32 id map (R + 256 G + 256^2 B); BadPNGError if missing, empty or unreadable.

  OpenCV decodes a little faster than PIL, and BGR -> RGBA with alpha zeroed, viewed as little-endian
  uint32, IS the id map: one pass instead of three shifted conversions. PIL for anything not 8-bit BGR
  and for what OpenCV rejects (returning None, or raising cv2.error as OpenCV 5 does): its verdict is final.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    kind = "missing_file" if isinstance(e, FileNotFoundError) else "unreadable_file"
    raise BadPNGError(path, f"{kind}: {type(e).__name__}: {e.strerror or e}") from None
  if not data:
    raise BadPNGError(path, "empty_file: the file is empty (0 bytes)")
  opencv_error = ""
  try:
    import cv2
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if bgr is not None and bgr.ndim == 3 and bgr.shape[2] == 3 and bgr.dtype == np.uint8:
      rgba = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGBA)
      rgba[..., 3] = 0
      return rgba.view("<u4")[..., 0]
  except ImportError:
    pass
  except Exception as e:  # cv2.error, or whatever another version raises
    opencv_error = f" (OpenCV: {describe(e)})"
  try:
    with Image.open(io.BytesIO(data)) as im:
      rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # a truncated file fails here
  except Exception as e:  # whatever PIL's version raises for this file
    raise BadPNGError(path, f"unreadable_image: {describe(e)}{opencv_error}") from None
  ids = rgb[..., 0].astype(np.uint32)
  ids |= rgb[..., 1].astype(np.uint32) << 8
  ids |= rgb[..., 2].astype(np.uint32) << 16
  return ids


def _load_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise ValueError(f"{path}: not a readable JSON ({describe(e)})") from None


def _pairs(gt, pred):
  pred_by_image = {a["image_id"]: a for a in pred["annotations"]}
  pairs = []
  for gt_ann in gt["annotations"]:
    if gt_ann["image_id"] not in pred_by_image:
      raise KeyError(f"no prediction for the image with id {gt_ann['image_id']}")
    pairs.append((gt_ann, pred_by_image[gt_ann["image_id"]]))
  return pairs


def _evaluate_chunk(args):
  """(PQ state, bad inputs) of some images. Skipping, a bad prediction counts as an empty one (its
  ground-truth segments all false negatives; dropping it would inflate PQ), a bad ground truth leaves
  the image out."""
  categories, pairs, gt_dir, pred_dir, skip = args
  acc, bad = PQAccumulator(categories), []

  def report(err, gt_ann, action):
    if not skip:
      raise err
    bad.append({"file": err.path, "error": str(err), "image_id": gt_ann["image_id"],
                "action": action})

  for gt_ann, pred_ann in pairs:
    gt_path = os.path.join(gt_dir, gt_ann["file_name"])
    pred_path = os.path.join(pred_dir, pred_ann["file_name"])
    try:
      gt_map = read_id_png(gt_path)
    except BadPNGError as e:
      report(e, gt_ann, "ground truth unreadable: image left out")
      continue
    try:
      pred_map = read_id_png(pred_path)
      if pred_map.shape != gt_map.shape:
        raise BadPNGError(pred_path, f"size_mismatch: prediction {pred_map.shape} vs ground truth "
                          f"{gt_map.shape} ({gt_path})")
      acc.add(pred_map, pred_ann["segments_info"], gt_map, gt_ann["segments_info"])
      continue
    except BadPNGError as e:
      err = e
    except (KeyError, ValueError, TypeError) as e:  # the PNG disagrees with its segments_info
      if not skip:  # the type callers know, with the files named
        e.add_note(f"while evaluating the prediction {pred_path} against {gt_path}")
        raise
      err = BadPNGError(pred_path, f"bad_prediction: {describe(e)} (ground truth {gt_path})")
    report(err, gt_ann, "counted as an empty prediction")
    try:
      acc.add(np.zeros_like(gt_map), [], gt_map, gt_ann["segments_info"])
    except (KeyError, ValueError, TypeError) as e:  # then it was the ground truth's segments_info
      bad[-1]["action"] = "image left out"
      bad.append({"file": gt_path, "error": f"{gt_path}: bad_ground_truth: {describe(e)}",
                  "image_id": gt_ann["image_id"], "action": "image left out"})
  return acc.state(), bad


def pq_compute(gt_json_file, gt_dir, pred_json_file, pred_dir, workers: int = 1,
               bad_input: str = "raise") -> dict:
  """The metric over a whole prediction set; workers > 1 splits the images over processes.

  bad_input 'raise': an unreadable PNG (missing, empty, truncated, wrong size) raises BadPNGError naming
  it; 'skip': each is logged to stderr and listed in result['bad_input'] ({file, error, image_id,
  action}), a bad prediction scored as an empty one, a bad ground truth leaving its image out.
  """
  if bad_input not in ("raise", "skip"):
    raise ValueError(f"bad_input must be 'raise' or 'skip', got {bad_input!r}")
  gt = _load_json(gt_json_file)
  pred = _load_json(pred_json_file)
  categories = gt["categories"]
  pairs = _pairs(gt, pred)
  acc = PQAccumulator(categories)
  workers = max(1, min(int(workers), len(pairs)))
  skip = bad_input == "skip"
  chunks = [(categories, pairs[i::workers], gt_dir, pred_dir, skip) for i in range(workers)]
  if workers == 1:
    outs = [_evaluate_chunk(chunks[0])]
  else:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      outs = pool.map(_evaluate_chunk, chunks)
  acc.merge(np.stack([state for state, _ in outs]))
  result = acc.result()
  if skip:
    bad = sorted((b for _, chunk_bad in outs for b in chunk_bad), key=lambda b: b["file"])
    for b in bad:
      print(f"pq_compute: bad input {b['error']}: {b['action']}", file=sys.stderr)
    result["bad_input"] = bad
  return result


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
  p.add_argument("--bad-input", choices=("raise", "skip"), default="raise",
                 help="an unreadable PNG: raise naming it, or skip (log it, list it under 'bad_input'; "
                 "a bad prediction scores as an empty one, a bad ground truth leaves its image out)")
  args = p.parse_args(argv)
  start = time.time()
  result = pq_compute(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir, workers=args.workers,
                      bad_input=args.bad_input)
  print(format_table(result))
  if result.get("bad_input"):
    print(f"{len(result['bad_input'])} bad input(s) skipped (listed on stderr)", file=sys.stderr)
  print(f"time: {time.time() - start:.2f} s", file=sys.stderr)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(result, per_class={str(k): v for k, v in result["per_class"].items()}), f, indent=1)
  return result


if __name__ == "__main__":
  main()
