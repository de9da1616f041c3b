"""Input pipeline throughput per worker process, against Hugging Face `MaskFormerImageProcessor`.

  python -m maskformer_jax.bench.input [--root COCO_PANOPTIC_ROOT --split val2017] [--num-images 24]

Both sides run in this one process on one core (OpenCV and torch limited to one thread), on the same
images and targets, interleaved round by round; the median images/s over rounds is reported, and each
recipe's ratio to HF. Both start from the same decoded example (JPEG + panoptic PNG decoded, ids mapped
to segments by `CocoPanopticSource`, timed as "decode"), so the ratio compares the preparation itself:
ours = decode + recipe (static canvas, targets as a segment-index map); HF = decode + its processor
(resize shortest edge 800 / max 1333, normalise, pad to /32, one binary mask per segment). Without
--root a synthetic COCO-layout set of 640x480 images is generated (2 stuff + 2-6 thing segments each).
"""
import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
import warnings

import numpy as np

from maskformer_jax.data import synthetic, transforms
from maskformer_jax.data.coco_panoptic import CocoPanopticSource

# recipe -> (canvas, as in the published configs)
RECIPES = {"coco_detr": (1344, 1344), "lsj": (1024, 1024), "ade20k": (512, 512)}
EVAL = ((800, 1344), 800, 1333)


def hf_processor():
  warnings.filterwarnings("ignore")
  import transformers
  transformers.logging.set_verbosity_error()
  from transformers import MaskFormerImageProcessor
  return MaskFormerImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333},
                                  size_divisor=32, ignore_index=255, do_reduce_labels=False)


def hf_prepare(processor, ex):
  """The HF way: an instance-id map (void/crowd = ignore_index 255) plus instance -> class."""
  seg = ex["segments"]
  inst = np.where(seg >= 0, seg + 1 + (seg >= 254), 255).astype(np.int32)  # ids skip 255
  mapping = {int(s + 1 + (s >= 254)): int(ex["seg_labels"][s]) for s in np.unique(seg) if s >= 0}
  return processor(images=[ex["image"]], segmentation_maps=[inst],
                   instance_id_to_semantic_id=mapping, return_tensors="np")


def run(root, split, num_images, rounds, seed=0, out=print):
  import cv2
  import torch
  cv2.setNumThreads(1)
  torch.set_num_threads(1)
  src = CocoPanopticSource(root, split, bad_input="raise")
  idx = list(range(min(num_images, len(src))))
  proc = hf_processor()
  m, k = 100, src.num_classes

  def decode():
    for i in idx:
      src[i]

  def ours(recipe):
    def f():
      for i in idx:
        ex = src[i]
        if recipe == "eval":
          transforms.eval_example(ex, canvas=EVAL[0], min_size=EVAL[1], max_size=EVAL[2],
                                  max_instances=m, num_classes=k)
        else:
          transforms.train_example(ex, np.random.default_rng([seed, i]), recipe=recipe,
                                   canvas=RECIPES[recipe], max_instances=m, num_classes=k)
    return f

  def hf():
    for i in idx:
      hf_prepare(proc, src[i])

  # Same targets on both sides (sanity): HF's mask count = our valid slots at the eval resize.
  for i in idx[:4]:
    ex = src[i]
    o, _ = transforms.eval_example(ex, canvas=EVAL[0], min_size=EVAL[1], max_size=EVAL[2],
                                   max_instances=m, num_classes=k)
    h = hf_prepare(proc, ex)
    assert len(h["class_labels"][0]) == o["valid"].sum(), (len(h["class_labels"][0]), o["valid"])
    assert sorted(h["class_labels"][0].tolist()) == sorted(o["labels"][o["valid"]].tolist())
  methods = {"decode only": decode, **{r: ours(r) for r in (*RECIPES, "eval")}, "hf": hf}
  rates = {name: [] for name in methods}
  for _ in range(rounds):
    for name, f in methods.items():
      t = time.perf_counter()
      f()
      rates[name].append(len(idx) / (time.perf_counter() - t))
  med = {name: statistics.median(r) for name, r in rates.items()}
  shapes = {tuple(src[i]["image"].shape[:2]) for i in idx}
  nseg = np.mean([len(src[i]["seg_labels"]) for i in idx])
  out(f"{len(idx)} images {sorted(shapes)}, {nseg:.1f} segments each on average; {rounds} rounds; "
      f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
  out("")
  out("| preparation (one process, one thread) | canvas | images/s (median) | vs HF |")
  out("|---|---|---|---|")
  canv = {**{r: f"{c[0]}x{c[1]}" for r, c in RECIPES.items()}, "eval": "800x1344",
          "decode only": "-", "hf": "800x1088 (pad /32)"}
  for name in methods:
    label = {"hf": "HF MaskFormerImageProcessor (+ decode)", "decode only": "decode only",
             "eval": "ours: eval resize (+ decode)"}.get(name, f"ours: {name} (+ decode)")
    out(f"| {label} | {canv[name]} | {med[name]:.1f} | {med[name] / med['hf']:.2f}x |")
  return med


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", default="")
  p.add_argument("--split", default="val2017")
  p.add_argument("--num-images", type=int, default=24)
  p.add_argument("--rounds", type=int, default=5)
  a = p.parse_args(argv)
  root = a.root or synthetic.generate(os.path.join(tempfile.gettempdir(), "maskformer_bench_input"),
                                      num_train=1, num_val=a.num_images, image_size=(480, 640),
                                      seed=0)
  run(root, a.split, a.num_images, a.rounds)


if __name__ == "__main__":
  main()
