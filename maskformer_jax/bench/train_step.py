"""Times the full jitted train step of a real config: compile time, step time, images/s, memory, FLOPs.

  python -m maskformer_jax.bench.train_step --config configs/coco_panoptic.py --batch 8 \
      --size 512 512 --variants float32 bfloat16 scipy bfloat16+remat bfloat16+points [--steps 10] \
      [--profile 15]

A variant is one or more of these joined by "+", measured one after another in the same process on the
same batch (ratios are to the first): `float32` / `bfloat16` = compute dtype with matching in the step
(the design); `scipy` = `loss.matcher="scipy"`, the original's host-side Hungarian through a callback
inside the step; `remat` = `model.remat` (recompute block and layer activations in the backward pass);
`points` = `loss.point_sampling` (Mask2Former's point-sampled mask losses instead of full-resolution
upsampling); `instances` = overlapping instance targets in data.instance_layers layers (the COCO
instance recipe's batch, segments [B, H, W, L]) instead of one segment a pixel; `stacked` = the default
batch's targets stored in L layers (the cost of the layers alone). The batch is synthetic with realistic structure (20 rectangular segments of random classes
per image), so the matcher and the mask losses do their real work.

Memory is XLA's own account of the compiled step (`memory_analysis()`: arguments + outputs - donated
aliases + temporaries), the same on every backend, plus the allocator's peak where the device reports one
(GPU, TPU). FLOPs come from XLA's cost analysis of the compiled step, which counts what runs
(recomputation included, so with `remat` it is hardware rather than model FLOPs); utilisation is
FLOPs / step time / the chip's dense bfloat16 peak (`slices.peak_tflops`) where its kind is known.
`--profile N` traces one step of each variant and prints its N costliest operations (jax.profiler).
"""
import argparse
import platform
import time

import jax
import numpy as np

from maskformer_jax import sharding
from maskformer_jax import slices
from maskformer_jax import train_step as ts
from maskformer_jax.config import load_config
from maskformer_jax.models import build_model


def make_batch(rng, b, h, w, m, k, segments_per_image=20, layers=0, overlap=True):
  """layers > 0: instance targets, segments [B, H, W, layers], the rectangles overlapping (each pixel of
  one in the first layer free there) instead of occluding each other; with overlap=False the occluding
  rectangles of layers=0 in layer 0 and the other layers empty (the same targets, stored in layers)."""
  if layers and not overlap:
    out = make_batch(rng, b, h, w, m, k, segments_per_image)
    empty = np.full((b, h, w, layers - 1), -1, np.int32)
    return dict(out, segments=np.concatenate([out["segments"][..., None], empty], axis=-1))
  seg = np.full((b, h, w, max(layers, 1)), -1, np.int32)
  labels = np.full((b, m), k, np.int32)
  valid = np.zeros((b, m), bool)
  n = min(segments_per_image, m)
  for i in range(b):
    for j in range(n):  # later rectangles occlude earlier ones, like the real data
      y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
      y1, x1 = y0 + rng.integers(8, h // 2), x0 + rng.integers(8, w // 2)
      box = seg[i, y0:y1, x0:x1]
      todo = np.ones(box.shape[:2], bool)
      for layer in range(layers) if layers else [0]:
        put = todo & (box[..., layer] < 0) if layers else todo
        box[..., layer][put] = j
        todo &= ~put
    present = np.unique(seg[i])
    present = present[present >= 0]
    valid[i, present] = True
    labels[i, present] = rng.integers(0, k, size=len(present))
  image = rng.integers(0, 256, size=(b, h, w, 3), dtype=np.uint8)
  return {"image": image, "segments": seg if layers else seg[..., 0], "labels": labels, "valid": valid}


# A variant's parts: name -> config change.
VARIANT_PARTS = {
    "float32": lambda c: setattr(c.model, "dtype", "float32"),
    "bfloat16": lambda c: setattr(c.model, "dtype", "bfloat16"),
    "scipy": lambda c: setattr(c.loss, "matcher", "scipy"),
    "jax": lambda c: setattr(c.loss, "matcher", "jax"),
    "remat": lambda c: setattr(c.model, "remat", True),
    "points": lambda c: setattr(c.loss, "point_sampling", True),
    "instances": lambda c: setattr(c.data, "dataset", "coco_instance"),
    "stacked": lambda c: setattr(c.data, "dataset", "coco_instance"),
}


def variant_config(config, variant):
  """`config` with each "+"-joined part of `variant` applied (float32 and the JAX matcher by default)."""
  config.model.dtype, config.loss.matcher = "float32", "jax"
  for part in variant.split("+"):
    if part not in VARIANT_PARTS:
      raise ValueError(f"unknown variant part {part!r} in {variant!r}; parts: {sorted(VARIANT_PARTS)}")
    VARIANT_PARTS[part](config)
  return config


def top_ops(trace_dir, n):
  """[(milliseconds, count, name)] of the `n` costliest operations in a jax.profiler trace: events are
  summed by name; the runtime's own spans (thunk executor, Python frames) are left out."""
  import collections
  import glob
  import gzip
  import json
  files = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
  if not files:
    return []
  events = json.load(gzip.open(files[0]))["traceEvents"]
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") == "X" and not name.startswith(("Thunk", "$", "Slinky", "PjitFunction")):
      total[name] += e.get("dur", 0)
      count[name] += 1
  return [(t / 1e3, count[k], k) for k, t in total.most_common(n)]


def xla_flops(compiled):
  """FLOPs of a compiled computation by XLA's cost analysis (nan where the backend gives none)."""
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return float(cost.get("flops", float("nan")))


def run_variant(config, batch_np, steps, profile=0):
  mesh = sharding.make_mesh(config.mesh)
  model = build_model(config.model)
  state = ts.init_state(config, model, mesh, jax.random.key(config.seed))
  step = ts.make_train_step(config, model, mesh)
  batch = ts.shard_batch(batch_np, mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  xla_gib = float("nan")
  if mem is not None:
    xla_gib = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
               + mem.temp_size_in_bytes) / 2**30
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  ops = []
  if profile:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
      with jax.profiler.trace(d):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
      ops = top_ops(d, profile)
  loss = float(metrics["loss"][0]) if "loss" in metrics else float("nan")
  stats = jax.devices()[0].memory_stats() or {}
  return {"compile_s": compile_s, "step_s": float(np.median(times)), "loss": loss,
          "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / 2**30, "xla_gib": xla_gib,
          "flops": xla_flops(compiled), "top_ops": ops}


def measure(config_path, batch_size, size, variants, steps, profile=0, log=print):
  """[(variant, run_variant's dict)] for each variant of `config_path` at `batch_size` x `size`."""
  rows = []
  for variant in variants:
    config = variant_config(load_config(config_path), variant)
    config.batch_size = batch_size
    config.data.image_size = tuple(size)
    layers = config.data.instance_layers if config.data.dataset == "coco_instance" else 0
    batch = make_batch(np.random.default_rng(0), batch_size, *size, config.data.max_instances,
                       config.model.num_classes, layers=layers, overlap="stacked" not in variant.split("+"))
    r = run_variant(config, batch, steps, profile)
    rows.append((variant, r))
    log(f"{variant}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items() if k != "top_ops"))
  return rows


def table(rows, batch_size):
  """The markdown table of `measure`'s rows (ratios to the first), then each variant's top operations."""
  kind = jax.devices()[0].device_kind
  peak = slices.peak_tflops(kind)
  base = rows[0][1]["step_s"]
  lines = ["| variant | compile s | step ms (median) | images/s | x first | XLA GiB | device peak GiB "
           f"| GFLOP/step | util. of bf16 peak | ms expected at {slices.UTILISATION:.0%} | loss |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for variant, r in rows:
    util = f"{r['flops'] / r['step_s'] / (peak * 1e12):.1%}" if peak else "n/a"
    expected = f"{1e3 * slices.step_time_estimate(r['flops'], peak):.1f}" if peak else "n/a"
    lines.append(f"| {variant} | {r['compile_s']:.1f} | {1e3 * r['step_s']:.1f} | {batch_size / r['step_s']:.1f} "
                 f"| {base / r['step_s']:.2f} | {r['xla_gib']:.2f} | {r['peak_gib']:.2f} "
                 f"| {r['flops'] / 1e9:.4g} | {util} | {expected} | {r['loss']:.3f} |")
  for variant, r in rows:
    if r["top_ops"]:
      lines += ["", f"Costliest operations of `{variant}` (one traced step):", "", "| ms | calls | op |",
                "|---|---|---|"]
      lines += [f"| {ms:.1f} | {n} | `{name[:80]}` |" for ms, n, name in r["top_ops"]]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/coco_panoptic.py")
  p.add_argument("--batch", type=int, default=8, help="global batch")
  p.add_argument("--size", type=int, nargs=2, default=(512, 512))
  p.add_argument("--variants", nargs="+", default=["float32", "bfloat16", "scipy"])
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--profile", type=int, default=0, metavar="N", help="print each variant's N costliest ops")
  args = p.parse_args(argv)
  for v in args.variants:  # fail before the first compilation
    variant_config(load_config(args.config), v)
  rows = measure(args.config, args.batch, args.size, args.variants, args.steps, args.profile)
  print(f"\n{args.config}, global batch {args.batch} at {args.size[0]}x{args.size[1]}; {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {platform.machine()}")
  print(table(rows, args.batch))
  return rows


if __name__ == "__main__":
  main()
