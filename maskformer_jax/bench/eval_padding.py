"""How far evaluation padding moves panoptic results, against the original's inference on the same weights.

  python -m maskformer_jax.bench.eval_padding --config configs/demo.py --checkpoint runs/demo \
      [--root DIR] [--split val2017] [--num-images 100] [--min-size 64] [--max-size 107] \
      [--canvas 64 128] [--canvas 128 128] [--reference exact]

The original evaluates one image per batch: with SIZE_DIVISIBILITY 0 the network sees the resized image
and nothing else; with the code's default of 32 it sees it padded to the next multiples of 32 with the
pixel mean (0 after normalisation). Our evaluation resizes every image the same way but runs it on a
static canvas, padded bottom/right (with the pixel mean since models.normalize_image takes the content
size; with black before), and the single-canvas mode shrinks an image that does not fit. Nothing in the model masks padding: the backbone's convolutions, the pixel decoder's GroupNorm
statistics, the "+6 Enc" encoder's self-attention, the decoder's cross-attention and both sine position
embeddings (normalised over the whole map) all see it. Each image is therefore run, with the same
weights, as

- `exact`: the test resize (shortest edge min_size, longest <= max_size) and nothing else, the model at
  exactly that size (a ResNet MaskFormer, like the original's, runs at any size);
- `pad32`: the same image padded to the next multiples of 32 with black, as our pipeline padded before;
- `pad32_mean`: the same padded with the pixel mean, as the original's ImageList (and Hugging Face's
  image processor) pads;
- `canvas HxW`: exactly what our evaluation feeds the model (transforms.eval_example on that canvas).

Every output goes through our panoptic post-processing to the original resolution
(inference.postprocess_to_original), is compared with the reference variant (`exact` unless
--reference says otherwise; see `compare`) and is scored with the project's PQ evaluator
(evaluation.pq.PQAccumulator) on the same images.
"""
import argparse
import datetime
import math
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from maskformer_jax import checkpoint
from maskformer_jax import inference
from maskformer_jax import sharding
from maskformer_jax.config import load_config
from maskformer_jax.data import pipeline
from maskformer_jax.data import synthetic
from maskformer_jax.data import transforms
from maskformer_jax.evaluation.panoptic import metric_row, original_category_ids
from maskformer_jax.evaluation.pq import PQAccumulator
from maskformer_jax.models import build_model, normalize_image
from maskformer_jax.models.maskformer import MaskFormer


_COMPILED = {}  # (model, input shape, compiler options) -> executable, shared by all runs


def make_forward(model: MaskFormer, compiler_options=None):
  """(variables, normalised images [1, H, W, 3]) -> main-layer outputs of `model` at any size.

  Compiled once per model and input size in a process; `compiler_options` (XLA options) lets the tests
  trade code quality for compile time on a small CPU."""
  fn = jax.jit(lambda variables, images: model.apply(variables, images, train=False))
  options = tuple(sorted((compiler_options or {}).items()))

  def forward(variables, images):
    key = (model, images.shape, options)
    if key not in _COMPILED:
      _COMPILED[key] = fn.lower(variables, images).compile(compiler_options)
    return _COMPILED[key](variables, images)
  return forward


def _round_up(x, m=32):
  return int(math.ceil(x / m) * m)


def variant_inputs(ex, *, min_size, max_size, canvases, max_instances, num_classes):
  """{variant: (normalised image [1, H, W, 3], content (h, w))} for one decoded example (source format).

  The content is what the image occupies inside the input (top-left); the rest is padding."""
  h0, w0 = ex["image"].shape[:2]
  hw = transforms.shortest_edge_size(h0, w0, min_size, max_size)
  img, _ = transforms.crop_resize(ex["image"], ex["segments"], (0, 0, h0, w0), hw, False)
  padded = (_round_up(hw[0]), _round_up(hw[1]))
  black = np.zeros((*padded, 3), np.uint8)
  black[:hw[0], :hw[1]] = img
  norm = np.asarray(normalize_image(img))
  mean = np.zeros((*padded, 3), np.float32)  # 0 after normalisation = the pixel mean
  mean[:hw[0], :hw[1]] = norm
  out = {"exact": (norm[None], hw), "pad32": (np.asarray(normalize_image(black))[None], hw),
         "pad32_mean": (mean[None], hw)}
  for canvas in canvases:
    e, _ = transforms.eval_example(ex, canvas=canvas, min_size=min_size, max_size=max_size,
                                   max_instances=max_instances, num_classes=num_classes)
    out[canvas_name(canvas)] = (np.asarray(normalize_image(e["image"][None], e["image_size"][None])),
                                tuple(e["image_size"]))
  return out


def canvas_name(canvas):
  return f"canvas {canvas[0]}x{canvas[1]}"


def compare(a, b):
  """Agreement of two panoptic results (id map, segments_info) of one image at the same resolution.

  Segments of `a` and `b` are paired one-to-one so that the paired overlap (pixels of the same category)
  is largest (Hungarian). A pixel agrees when both give it the same category and paired segments, or
  both leave it void. Returns dict(pixel=fraction agreeing, category=fraction with the same category
  (void included), segments_a, segments_b)."""
  (ma, ia), (mb, ib) = a, b
  ma, mb = np.asarray(ma, np.int64), np.asarray(mb, np.int64)

  def category_map(m, info):
    lut = np.full(max([s["id"] for s in info], default=0) + 1, -1, np.int64)
    for s in info:
      lut[s["id"]] = s["category_id"]
    return lut[m]

  ca, cb = category_map(ma, ia), category_map(mb, ib)
  same = ca == cb
  both_void = same & (ca < 0)
  # Overlap of segment ia[i] with ib[j], counting only pixels of the same category (0 across categories).
  ra = {s["id"]: i for i, s in enumerate(ia)}
  rb = {s["id"]: j for j, s in enumerate(ib)}
  overlap = np.zeros((len(ia), len(ib)), np.int64)
  sel = same & (ca >= 0)
  pairs, counts = np.unique(np.stack([ma[sel], mb[sel]]), axis=1, return_counts=True)
  for (x, y), n in zip(pairs.T, counts):
    overlap[ra[int(x)], rb[int(y)]] = n
  rows, cols = linear_sum_assignment(overlap, maximize=True) if overlap.size else ([], [])
  matched = int(overlap[rows, cols].sum()) + int(both_void.sum())
  return dict(pixel=matched / ma.size, category=float(same.mean()), segments_a=len(ia),
              segments_b=len(ib))


def run(config, variables, model, source, *, num_images=-1, min_size=None, max_size=None,
        canvases=None, reference="exact", compiler_options=None):
  """Runs every variant on the first `num_images` of `source` (all: -1); returns the report.

  `variables` are {params, batch_stats} for `model` (a MaskFormer with a ResNet: any input size).

  report = {"variants": [names], "images": [{image_id, orig_size, inputs: {variant: (H, W)},
  contents: {variant: (h, w)}, agreement: {variant: compare(reference, variant)}}], "pq": {variant:
  metric_row}, "summary": {variant: {...}}} (see `summarize`)."""
  d = config.data
  min_size = int(min_size or d.eval_min_size)
  max_size = int(max_size or d.eval_max_size)
  canvases = [tuple(int(s) for s in c) for c in (canvases or [d.eval_size])]
  forward = make_forward(model, compiler_options)
  categories = source.categories
  n = len(source) if num_images < 0 else min(num_images, len(source))
  accs, images, names = {}, [], None
  t0 = time.perf_counter()
  for i in range(n):
    ex = source[i]
    if "skip" in ex:  # a bad example (data.bad_input=skip): the evaluation skips it too
      continue
    inputs = variant_inputs(ex, min_size=min_size, max_size=max_size, canvases=canvases,
                            max_instances=d.max_instances, num_classes=config.model.num_classes)
    names = names or list(inputs)
    gt_map, gt_info = source.ground_truth(ex["image_id"])
    gt_info = original_category_ids(gt_info, categories)
    results, rec = {}, dict(image_id=int(ex["image_id"]), orig_size=tuple(ex["image"].shape[:2]),
                            inputs={}, contents={})
    for name, (x, content) in inputs.items():
      outputs = forward(variables, jnp.asarray(x))
      batch = {"image_size": np.asarray([content], np.int32),
               "orig_size": np.asarray([ex["image"].shape[:2]], np.int32),
               "image_id": np.asarray([ex["image_id"]], np.int32)}
      results[name] = inference.postprocess_to_original(
          jax.device_get(outputs), batch, categories=categories, task="panoptic",
          object_mask_threshold=config.eval.object_mask_threshold,
          overlap_threshold=config.eval.overlap_threshold, padded_size=x.shape[1:3])[0]
      rec["inputs"][name], rec["contents"][name] = tuple(x.shape[1:3]), tuple(int(s) for s in content)
      accs.setdefault(name, PQAccumulator(categories)).add(*results[name], gt_map, gt_info)
    rec["agreement"] = {name: compare(results[reference], r) for name, r in results.items()}
    images.append(rec)
  report = dict(variants=names or [], reference=reference, images=images,
                seconds=time.perf_counter() - t0, pq={k: metric_row(a.result()) for k, a in accs.items()},
                min_size=min_size, max_size=max_size, canvases=canvases)
  report["summary"] = summarize(report)
  return report


def summarize(report):
  """Per variant: median, mean and worst pixel / category agreement with the reference variant, the
  fraction of images whose segment count differs from the reference's, the median padding (fraction of
  input pixels outside the content), the content scale relative to `exact` (< 1: the canvas shrank the
  image), PQ."""
  out = {}
  for name in report["variants"]:
    agree = [r["agreement"][name] for r in report["images"]]
    pixel = np.array([a["pixel"] for a in agree])
    pad = [1 - np.prod(r["contents"][name]) / np.prod(r["inputs"][name]) for r in report["images"]]
    scale = [r["contents"][name][0] / r["contents"]["exact"][0] for r in report["images"]]
    worst = int(np.argmin(pixel))
    out[name] = dict(
        pixel_median=float(np.median(pixel)), pixel_min=float(pixel.min()),
        pixel_mean=float(pixel.mean()), worst_image_id=report["images"][worst]["image_id"],
        category_median=float(np.median([a["category"] for a in agree])),
        category_min=float(min(a["category"] for a in agree)),
        count_differs=float(np.mean([a["segments_a"] != a["segments_b"] for a in agree])),
        padding_median=float(np.median(pad)), scale_median=float(np.median(scale)),
        scale_min=float(min(scale)), **{k: report["pq"][name][k] for k in ("pq", "pq_th", "pq_st")})
  return out


def print_table(report, out=print):
  ref = report["reference"]
  out(f"| variant | input (first image) | padding (median) | content scale vs exact (median / min) | "
      f"pixel agreement with {ref} (median / mean / worst) | same category (median / worst) | "
      "segment count differs | PQ | PQ th | PQ st |")
  out("|---|---|---|---|---|---|---|---|---|---|")
  first = report["images"][0] if report["images"] else None
  for name, s in report["summary"].items():
    size = "x".join(map(str, first["inputs"][name])) if first else "-"
    out(f"| {name} | {size} | {100 * s['padding_median']:.0f}% | {s['scale_median']:.2f} / "
        f"{s['scale_min']:.2f} | {100 * s['pixel_median']:.2f}% / {100 * s['pixel_mean']:.2f}% / "
        f"{100 * s['pixel_min']:.2f}% | {100 * s['category_median']:.2f}% / {100 * s['category_min']:.2f}% | "
        f"{100 * s['count_differs']:.0f}% | {s['pq']:.2f} | {s['pq_th']:.2f} | {s['pq_st']:.2f} |")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/demo.py")
  p.add_argument("--checkpoint", required=True, help="training workdir, a step directory in it, or a "
                 "converted checkpoint (as predict's --checkpoint)")
  p.add_argument("--step", default="latest", help="with a workdir: 'latest', 'best' or a step number")
  p.add_argument("--root", default="", help="dataset root (default: the config's, or its synthetic set)")
  p.add_argument("--split", default="", help="default: config.data.val_split")
  p.add_argument("--num-images", type=int, default=-1, help="-1: the whole split")
  p.add_argument("--min-size", type=int, default=0, help="test resize shortest edge (default: config)")
  p.add_argument("--max-size", type=int, default=0, help="test resize longest edge (default: config)")
  p.add_argument("--canvas", type=int, nargs=2, action="append", metavar=("H", "W"),
                 help="static eval canvas(es) to compare (repeatable; default: config.data.eval_size)")
  p.add_argument("--reference", default="exact", choices=("exact", "pad32", "pad32_mean"),
                 help="the variant the others are compared with")
  a = p.parse_args(argv)
  config = load_config(a.config)
  with config.unlocked():
    config.mesh.data, config.mesh.model = 1, 1
    if a.root:
      config.data.root = a.root
  config = synthetic.resolve_data_root(config)
  source = pipeline.make_source(config, a.split or config.data.val_split)
  mesh = sharding.make_mesh(config.mesh, devices=jax.local_devices()[:1])
  model = build_model(config.model)
  state, step = checkpoint.load_state(config, model, mesh, a.checkpoint, a.step)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  report = run(config, variables, model, source, num_images=a.num_images, min_size=a.min_size,
               max_size=a.max_size, canvases=a.canvas, reference=a.reference)
  print(f"\n{a.config} at step {step}, {source!r}, {len(report['images'])} images; test resize shortest "
        f"edge {report['min_size']}, longest <= {report['max_size']}; thresholds "
        f"{config.eval.object_mask_threshold} / {config.eval.overlap_threshold}; "
        f"{report['seconds']:.0f} s; {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}, {platform.machine()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
  print_table(report)
  return report


if __name__ == "__main__":
  main()
