"""Times the full jitted train step of a real config: compile time, step time, images/s, memory.

  python -m maskformer_jax.bench.train_step --config configs/coco_panoptic.py --batch 8 \
      --size 512 512 --variants float32 bfloat16 scipy [--steps 10]

Variants, measured one after another in the same process on the same batch (ratios are to the first):
`float32` / `bfloat16` = compute dtype with matching in the step (the design); `scipy` = float32 with
`loss.matcher="scipy"`, i.e. the original's host-side Hungarian through a callback inside the step.
The batch is synthetic with realistic structure (20 rectangular segments of random classes per image),
so the matcher and the mask losses do their real work. Run it on the accelerator you care about; on a
CPU use small sizes.
"""
import argparse
import platform
import time

import jax
import numpy as np

from maskformer_jax import sharding
from maskformer_jax import train_step as ts
from maskformer_jax.config import load_config
from maskformer_jax.models import build_model


def make_batch(rng, b, h, w, m, k, segments_per_image=20):
  seg = np.full((b, h, w), -1, np.int32)
  labels = np.full((b, m), k, np.int32)
  valid = np.zeros((b, m), bool)
  n = min(segments_per_image, m)
  for i in range(b):
    for j in range(n):  # later rectangles occlude earlier ones, like the real data
      y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
      y1, x1 = y0 + rng.integers(8, h // 2), x0 + rng.integers(8, w // 2)
      seg[i, y0:y1, x0:x1] = j
    present = np.unique(seg[i])
    present = present[present >= 0]
    valid[i, present] = True
    labels[i, present] = rng.integers(0, k, size=len(present))
  image = rng.integers(0, 256, size=(b, h, w, 3), dtype=np.uint8)
  return {"image": image, "segments": seg, "labels": labels, "valid": valid}


def run_variant(config, batch_np, steps):
  mesh = sharding.make_mesh(config.mesh)
  model = build_model(config.model)
  state = ts.init_state(config, model, mesh, jax.random.key(config.seed))
  step = ts.make_train_step(config, model, mesh)
  batch = ts.shard_batch(batch_np, mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  loss = float(metrics["loss"][0]) if "loss" in metrics else float("nan")
  mem = jax.devices()[0].memory_stats() or {}
  peak = mem.get("peak_bytes_in_use", 0) / 2**30
  return {"compile_s": compile_s, "step_s": float(np.median(times)), "loss": loss, "peak_gib": peak}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/coco_panoptic.py")
  p.add_argument("--batch", type=int, default=8, help="global batch")
  p.add_argument("--size", type=int, nargs=2, default=(512, 512))
  p.add_argument("--variants", nargs="+", default=["float32", "bfloat16", "scipy"])
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--point-sampling", action="store_true", help="Mask2Former point-sampled mask losses")
  args = p.parse_args(argv)

  rows = []
  for variant in args.variants:
    config = load_config(args.config)
    config.batch_size = args.batch
    config.data.image_size = tuple(args.size)
    config.loss.point_sampling = args.point_sampling
    config.model.dtype = "bfloat16" if variant == "bfloat16" else "float32"
    config.loss.matcher = "scipy" if variant == "scipy" else "jax"
    batch = make_batch(np.random.default_rng(0), args.batch, *args.size, config.data.max_instances,
                       config.model.num_classes)
    r = run_variant(config, batch, args.steps)
    rows.append((variant, r))
    print(f"{variant}: {r}", flush=True)

  base = rows[0][1]["step_s"]
  print(f"\n{args.config}, global batch {args.batch} at {args.size[0]}x{args.size[1]}, "
        f"point_sampling={args.point_sampling}; {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}, {platform.machine()}")
  print("| variant | compile s | step ms (median) | images/s | x first | peak GiB | loss |")
  print("|---|---|---|---|---|---|---|")
  for variant, r in rows:
    print(f"| {variant} | {r['compile_s']:.1f} | {1e3 * r['step_s']:.1f} | {args.batch / r['step_s']:.1f} "
          f"| {base / r['step_s']:.2f} | {r['peak_gib']:.2f} | {r['loss']:.3f} |")


if __name__ == "__main__":
  main()
