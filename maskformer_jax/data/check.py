"""Validate a dataset before training on it, and report every problem with the file it is in.

  python -m maskformer_jax.data.check --config configs/coco_panoptic.py --config.data.root=/data/coco
  python -m maskformer_jax.data.check --config configs/coco_panoptic.py:runlocal --config.data.root=/tmp/synth --splits val2017

Errors (the loader would skip or refuse these): missing, empty or unreadable images and PNGs (corrupt,
truncated), PNG segment ids absent from the JSON, unknown category ids, PNG/image size mismatch, images
without an annotation row, malformed annotation rows (a field missing or not an integer), any other
exception while reading an example (decode_error), a split that cannot be opened at all (bad_dataset).
Warnings: JSON segments absent from the PNG, areas that disagree with the PNG, images without any
segment, images with more segments than data.max_instances, a model.num_classes that does not match the
categories; for COCO instances, annotations without a valid polygon (left out). Exit status 1 if there is any error; no single example stops the check.
"""
import collections
import concurrent.futures
import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from maskformer_jax import paths

from maskformer_jax.data import pipeline
from maskformer_jax.data.coco_panoptic import (BadInputError, CocoPanopticSource, as_bad_input,
                                               decode_rgb, index_segments, read_bytes, rgb_to_id)

ERRORS = ("missing_file", "unreadable_file", "empty_file", "unreadable_image", "decode_error",
          "png_ids_not_in_json", "unknown_category", "size_mismatch", "missing_annotation",
          "bad_annotation", "duplicate_image_id", "num_classes_mismatch", "bad_dataset")


def check_coco_example(src, index, max_instances):
  """Problems of one COCO panoptic example: a list of (kind, path, message)."""
  problems = []
  try:
    src.check_row(index)
    image = decode_rgb(read_bytes(src.image_path(index)), src.image_path(index))
    png = src.png_path(index)
    idmap = rgb_to_id(decode_rgb(read_bytes(png), png))
    if idmap.shape != image.shape[:2]:
      raise BadInputError("size_mismatch", png, f"PNG {idmap.shape} vs image {image.shape[:2]}")
    h, w = src._sizes[index]
    if (h, w) != (0, 0) and (h, w) != image.shape[:2]:
      problems.append(("size_mismatch", src.image_path(index),
                       f"JSON says {h}x{w}, file is {image.shape[0]}x{image.shape[1]}"))
    ids, _, crowd, area = src._table(index)
    pos = index_segments(idmap, ids, png)
    counts = np.bincount(pos.ravel() + 1, minlength=len(ids) + 1)[1:]
    if (counts == 0).any():
      problems.append(("json_segment_not_in_png", png,
                       f"segment ids {ids[counts == 0][:5].tolist()} have no pixel"))
    bad_area = (counts != area) & (counts > 0)
    if bad_area.any():
      problems.append(("area_mismatch", png, f"{bad_area.sum()} segments' JSON area differs "
                       "from their pixel count"))
    n = int(((counts > 0) & ~crowd).sum())
    if n == 0:
      problems.append(("no_segments", png, "no non-crowd segment"))
    if n > max_instances:
      problems.append(("more_than_max_instances", png, f"{n} segments > {max_instances}"))
  except Exception as e:  # one example's problem, whatever raised it
    e = as_bad_input(e, src.files(index))
    problems.append((e.kind, e.path, str(e)))
  return problems


def check_generic_example(src, index):
  """Any other source: decode with the 'raise' policy."""
  try:
    ex = src._decode(index)
    if not (ex["segments"] >= 0).any():
      return [("no_segments", str(ex["image_id"]), "no labelled pixel")]
    return []
  except Exception as e:  # one example's problem, whatever raised it
    e = as_bad_input(e, src.files(index))
    return [(e.kind, e.path, str(e))]


def check_split(config, split, *, threads=8, show=5, out=sys.stdout):
  """Check one split; prints a report and returns {kind: count}."""
  d = config.data
  # The 'raise' policy and no class-count check: both are reported here instead.
  src = pipeline.make_source(config, split, bad_input="raise", check_classes=False)
  counts, examples = collections.Counter(), collections.defaultdict(list)
  if len(src.categories) != config.model.num_classes:
    counts["num_classes_mismatch"] += 1
    examples["num_classes_mismatch"].append(
        f"model.num_classes = {config.model.num_classes}, the dataset has {len(src.categories)}")
  for kind, path, msg in getattr(src, "annotation_problems", ()):  # rows that belong to no example
    counts[kind] += 1
    if len(examples[kind]) < show:
      examples[kind].append(f"{path}: {msg}")
  if getattr(src, "invalid_polygons", 0):  # COCO instances: left out, as detectron2 does
    counts["invalid_polygons"] += src.invalid_polygons
    examples["invalid_polygons"].append(f"{src.ann_path}: {src.invalid_polygons} annotations have no "
                                        "polygon of >= 3 points and are left out")
  seen = collections.Counter(np.asarray(getattr(src, "image_ids", [])).tolist())
  for image_id, k in seen.items():
    if k > 1:
      counts["duplicate_image_id"] += 1
      examples["duplicate_image_id"].append(f"image id {image_id} listed {k} times")
  if isinstance(src, CocoPanopticSource):
    fn = lambda i: check_coco_example(src, i, d.max_instances)
  else:
    fn = lambda i: check_generic_example(src, i)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for problems in pool.map(fn, range(len(src))):
      for kind, path, msg in problems:
        counts[kind] += 1
        if len(examples[kind]) < show:
          examples[kind].append(msg if str(path) in msg else f"{path}: {msg}")
  errors = sum(v for k, v in counts.items() if k in ERRORS)
  print(f"{src!r}: {len(src)} examples, {len(src.categories)} categories "
        f"({int(np.sum(src.is_thing))} things), {errors} errors, "
        f"{sum(counts.values()) - errors} warnings", file=out)
  for kind, n in sorted(counts.items()):
    print(f"  {'ERROR' if kind in ERRORS else 'warning'} {kind}: {n}", file=out)
    for e in examples[kind]:
      print(f"    {e}", file=out)
  return dict(counts)


def main(argv):
  del argv
  cfg = paths.absolute_config_paths(flags.FLAGS.config)
  splits = flags.FLAGS.splits or [cfg.data.train_split, cfg.data.val_split]
  total = collections.Counter()
  for split in splits:
    try:
      total.update(check_split(cfg, split, threads=flags.FLAGS.threads))
    except (ValueError, OSError) as e:  # the split cannot be opened at all (e.g. an unusable JSON)
      print(f"ERROR bad_dataset: split {split}: {e}")
      total["bad_dataset"] += 1
  errors = sum(v for k, v in total.items() if k in ERRORS)
  print("OK" if not errors else f"FAILED: {errors} errors")
  sys.exit(1 if errors else 0)


if __name__ == "__main__":  # flags defined here: the module is also a library (check_split)
  config_flags.DEFINE_config_file("config", None, "a config file from configs/", lock_config=True)
  flags.DEFINE_list("splits", [], "splits to check (default: data.train_split, data.val_split)")
  flags.DEFINE_integer("threads", 8, "decoding threads")
  flags.mark_flags_as_required(["config"])
  app.run(main)
