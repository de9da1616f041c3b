"""Panoptic post-processing to the original resolution: ours against Hugging Face's, per image.

  python -m maskformer_jax.bench.postprocess [--rounds 7] [--batch 2] [--queries 100] [--classes 133] \
      [--confident 30] [--orig 480 640 427 640] [--baseline a81b36f]

Ours is `inference.postprocess_to_original` (the original's order: mask logits upsampled to the padded
input, content cropped, resized to the original size, then the panoptic merge), timed after compilation;
HF is `MaskFormerImageProcessor.post_process_panoptic_segmentation` with `target_sizes` (the kept
queries' mask probabilities resized straight to the original size) and the same thresholds. Each side
gets its natural input (ours numpy from `jax.device_get`, as the evaluation hands it over; HF torch
tensors) and the two alternate round by round; the table gives medians and ratios. HF runs with one
torch thread by default: with torch's two, HF's time on the shared 2-core VM swung from 0.09 to 1.8
s/image with the other jobs' load (its threads wait on each other whenever one is descheduled), with one
it is steady. `--only ours` / `--only HF` time one side alone, to run each in its own process.
`--baseline REV` adds ours as it was at a git revision (its inference.py loaded from git), for a
before/after in the same run, after checking that both give the same maps and segments.

The inputs look like a trained COCO model's (`make_outputs`): `--confident` of the queries have one
class with probability 0.9-0.995, the rest favour no-object or a class at 0.2-0.6; each confident
query's mask logits are positive on its own cell of a random partition of the image (blobs with smooth
edges and some noise), the others are shrunken duplicates. COCO geometry: the original is resized to
shortest side `--min-size` (longest <= `--max-size`) and padded to `--padded`, the masks at 1/4 of that.

Before timing, the run checks that ours and HF produce the same panoptic maps and segments on these
inputs where the two are meant to agree: at the mask resolution, our merge with HF's area rule
(`panoptic_inference(hf_compat=True)`) against HF without `target_sizes`. At the original resolution they
differ by design (HF resizes probabilities of the whole padded map, ours logits of the cropped content,
and the original's area rule), so there only the segment counts are printed.
"""
import argparse
import os
import platform
import subprocess
import time
import types

import jax
import numpy as np

from maskformer_jax import inference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_outputs(rng, batch=2, queries=100, classes=133, confident=30, mask_size=(200, 336), unsure=10):
  """(pred_logits [B, Q, K+1], pred_masks [B, Q, h, w]) float32 shaped like a trained model's outputs."""
  h, w = mask_size
  logits = rng.normal(size=(batch, queries, classes + 1)).astype(np.float32)
  masks = np.empty((batch, queries, h, w), np.float32)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  for i in range(batch):
    centers = rng.uniform((0, 0), (h, w), size=(confident, 2)).astype(np.float32)
    dist = np.hypot(yy - centers[:, :1, None], xx - centers[:, 1:, None])
    dist *= rng.uniform(0.6, 1.6, (confident, 1, 1)).astype(np.float32)  # cells of varied size
    nearest = np.sort(dist, axis=0)[:2]
    order = rng.permutation(queries)
    conf, rest = order[:confident], order[confident:]
    logits[i, rest, classes] = rng.uniform(2, 7, len(rest))  # no-object, or a weak class
    set_probability(logits[i], conf, rng.integers(0, classes, confident), rng.uniform(0.9, 0.995, confident))
    doubt = rest[:unsure]  # one class at 0.2-0.6: dropped by a 0.8 threshold
    logits[i, doubt, classes] = 0.0
    set_probability(logits[i], doubt, rng.integers(0, classes, len(doubt)), rng.uniform(0.2, 0.6, len(doubt)))
    cell = np.empty(queries, int)
    cell[conf] = np.arange(confident)
    cell[rest] = rng.integers(0, confident, len(rest))
    cell_owner = conf
    for q in range(queries):
      c = cell[q]
      margin = np.where(dist[c] == nearest[0], nearest[1], nearest[0]) - dist[c]  # > 0 inside the cell
      if cell_owner[c] != q:  # a duplicate: the same cell, shrunk
        margin -= rng.uniform(0, 0.04 * (h + w))
      masks[i, q] = np.clip(0.5 * margin, -10, 10) + 0.5 * rng.normal(size=(h, w)).astype(np.float32)
  return logits, masks


def set_probability(logits, queries, classes, p):
  """Set logits[q, c] so that softmax(logits[q])[c] == p, for each (q, c, p)."""
  for q, c, pq in zip(queries, classes, p):
    others = np.exp(np.delete(logits[q], c).astype(np.float64)).sum()
    logits[q, c] = np.log(pq / (1 - pq) * others)


def coco_geometry(orig_sizes, min_size=800, max_size=1333):
  """Content (h, w) of each original after the eval resize (shortest side min_size, longest <= max_size)."""
  out = []
  for h, w in orig_sizes:
    s = min(min_size / min(h, w), max_size / max(h, w))
    out.append((int(round(h * s)), int(round(w * s))))
  return np.asarray(out, np.int32)


def hf_postprocess(processor, out, args, target_sizes=None):
  return processor.post_process_panoptic_segmentation(
      out, threshold=args.threshold, mask_threshold=0.5, overlap_mask_area_threshold=args.overlap,
      label_ids_to_fuse=set(range(args.things, args.classes)), target_sizes=target_sizes)


def check_against_hf(logits, masks, processor, out, args):
  """Our merge with HF's area rule equals HF's at the mask resolution: the same segments (one per
  surviving query, in query order, same class) and the same map once HF's ids are read off its list."""
  is_thing = np.arange(args.classes) < args.things
  ours = jax.device_get(inference.panoptic_inference(
      logits, masks, is_thing=is_thing, object_mask_threshold=args.threshold,
      overlap_threshold=args.overlap, hf_compat=True))
  n = 0
  for i, theirs in enumerate(hf_postprocess(processor, out, args)):
    seg, info = theirs["segmentation"].numpy(), theirs["segments_info"]
    surviving = np.flatnonzero(ours["query_segment"][i])
    if not info:  # HF: -1 where no query is kept at all
      assert len(surviving) == 0 and (ours["panoptic"][i] == 0).all() and set(np.unique(seg)) <= {-1, 0}
      continue
    assert [s["label_id"] for s in info] == np.argmax(logits[i, surviving], -1).tolist(), i
    lut = np.zeros(logits.shape[1] + 1, np.int64)
    lut[ours["query_segment"][i][surviving]] = [s["id"] for s in info]
    np.testing.assert_array_equal(lut[ours["panoptic"][i]], seg, err_msg=f"image {i}")
    n += len(info)
  return n


def baseline_module(rev):
  """inference.py as it was at a git revision, as a module (for a before/after in one run)."""
  src = subprocess.run(["git", "show", f"{rev}:maskformer_jax/inference.py"], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  mod = types.ModuleType(f"inference_at_{rev}")
  exec(compile(src, f"{rev}:maskformer_jax/inference.py", "exec"), mod.__dict__)  # noqa: S102
  return mod


def run(args):
  import torch
  from transformers import MaskFormerImageProcessor
  from transformers.models.maskformer.modeling_maskformer import MaskFormerForInstanceSegmentationOutput

  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  orig = np.asarray(args.orig, np.int32).reshape(-1, 2)
  orig = orig[np.arange(args.batch) % len(orig)]
  mask_size = (args.padded[0] // 4, args.padded[1] // 4)
  logits, masks = make_outputs(np.random.default_rng(args.seed), args.batch, args.queries, args.classes,
                               args.confident, mask_size)
  out = MaskFormerForInstanceSegmentationOutput(class_queries_logits=torch.from_numpy(logits),
                                                masks_queries_logits=torch.from_numpy(masks))
  # Ours as the evaluation hands them over: numpy from jax.device_get of the eval step's outputs.
  logits, masks = jax.device_get((jax.device_put(logits), jax.device_put(masks)))
  batch = dict(image_size=coco_geometry(orig, args.min_size, args.max_size), orig_size=orig,
               image_id=np.arange(1, args.batch + 1, dtype=np.int32))
  categories = [dict(id=k + 1, isthing=int(k < args.things), contiguous_id=k) for k in range(args.classes)]
  processor = MaskFormerImageProcessor()
  checked = check_against_hf(logits, masks, processor, out, args)

  def ours_with(mod):
    return lambda: mod.postprocess_to_original(
        dict(pred_logits=logits, pred_masks=masks), batch, categories=categories,
        object_mask_threshold=args.threshold, overlap_threshold=args.overlap, padded_size=tuple(args.padded))

  variants = {"ours": ours_with(inference)}
  if args.baseline:
    variants[f"ours at {args.baseline}"] = ours_with(baseline_module(args.baseline))
  variants["HF"] = lambda: hf_postprocess(processor, out, args, [tuple(map(int, s)) for s in orig])
  if args.only:  # one side alone in this process: nothing of the other's thread pool competes with it
    variants = {k: v for k, v in variants.items() if (k == "HF") == (args.only == "HF")}
  segments, first = {}, {}
  for name, fn in variants.items():  # compile, warm up, count segments
    t0 = time.perf_counter()
    res = fn()
    first[name] = time.perf_counter() - t0
    segments[name] = [len(r[1]) if isinstance(r, tuple) else len(r["segments_info"]) for r in res]
  if args.baseline and "ours" in variants:  # the change must not move a pixel
    for a, b in zip(variants["ours"](), variants[f"ours at {args.baseline}"]()):
      np.testing.assert_array_equal(a[0], b[0])
      assert a[1] == b[1]
  times = {name: [] for name in variants}
  for _ in range(args.rounds):
    for name, fn in variants.items():
      t0 = time.perf_counter()
      fn()
      times[name].append((time.perf_counter() - t0) / args.batch)
  return dict(times=times, segments=segments, first=first, checked=checked, orig=orig,
              content=batch["image_size"], mask_size=mask_size, torch_threads=torch.get_num_threads())


def table(result):
  """Markdown rows: median seconds per image and HF's time over each variant's (> 1: faster than HF), as
  the ratio of the medians and as the median of the per-round ratios (steadier when the load drifts)."""
  hf = np.asarray(result["times"].get("HF", np.nan))
  lines = ["| variant | s/image (median) | HF / variant (medians) | HF / variant (per round) | first call s "
           "| segments per image |", "|---|---|---|---|---|---|"]
  for name, t in result["times"].items():
    t = np.asarray(t)
    lines.append(f"| {name} | {np.median(t):.3f} | {np.median(hf) / np.median(t):.2f} | "
                 f"{np.median(hf / t):.2f} | {result['first'][name]:.1f} | "
                 f"{', '.join(map(str, result['segments'][name]))} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--queries", type=int, default=100)
  p.add_argument("--classes", type=int, default=133)
  p.add_argument("--things", type=int, default=80, help="classes [0, things) are things, the rest stuff")
  p.add_argument("--confident", type=int, default=30)
  p.add_argument("--orig", type=int, nargs="+", default=[480, 640, 427, 640], help="h w [h w ...], cycled")
  p.add_argument("--padded", type=int, nargs=2, default=(800, 1344), help="padded input; masks at 1/4")
  p.add_argument("--min-size", type=int, default=800)
  p.add_argument("--max-size", type=int, default=1333)
  p.add_argument("--threshold", type=float, default=0.8, help="object mask threshold (both sides)")
  p.add_argument("--overlap", type=float, default=0.8, help="overlap threshold (both sides)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--baseline", default=None, help="also time inference.py at this git revision")
  p.add_argument("--torch-threads", type=int, default=1,
                 help="HF's torch threads (0: torch's default; see above why 1)")
  p.add_argument("--only", choices=["ours", "HF"], help="time one side alone (run each in its own process)")
  args = p.parse_args(argv)
  r = run(args)
  print(f"\n{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; jax {jax.__version__} ({jax.devices()[0].device_kind}), torch threads "
        f"{r['torch_threads']}. Batch {args.batch}, Q={args.queries}, K={args.classes}, {args.confident} "
        f"confident queries per image, masks {r['mask_size'][0]}x{r['mask_size'][1]} (padded "
        f"{args.padded[0]}x{args.padded[1]}), content {r['content'].tolist()}, originals "
        f"{r['orig'].tolist()}; thresholds {args.threshold}/{args.overlap}; {args.rounds} alternated rounds. "
        f"Checked: ours == HF at the mask resolution ({r['checked']} segments).\n")
  print(table(r))
  return r


if __name__ == "__main__":
  main()
