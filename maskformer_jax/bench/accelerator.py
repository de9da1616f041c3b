"""Every benchmark on the machine's accelerator in one command, written to one markdown file.

  python -m maskformer_jax.bench.accelerator [--out accelerator.md] [--batch 32] [--budget-s 450]

For a GPU or TPU that is lent for a few minutes: nothing is downloaded, everything runs on synthetic
inputs, and each part is skipped (and listed as skipped) once `--budget-s` is spent, so the whole run
stays under the limit and what ran is written out however far it got. The parts, costliest last:

1. the COCO R50 "+6 Enc" train step (configs/coco_panoptic.py) at 512x512 in float32, bfloat16, and the
   memory-lean bfloat16 options (`remat`, `points`): compile, step time, images/s, XLA memory, FLOPs
   and the fraction of the chip's bfloat16 peak, with the bfloat16 step's costliest operations
   (bench/train_step.py);
2. the matcher on the device against scipy (bench/matcher.py);
3. Mask2Former: its deformable-attention sampling by gathers against the matmul formulation
   (bench/msdeform.py), and the train step of `--m2f-config` (configs/mask2former.py, bfloat16 as its
   recipe) at the same batch and size;
4. when torch and transformers are installed there: the post-processing against Hugging Face's
   (bench/postprocess.py), and the side by side with PyTorch (bench/vs_pytorch.py), which is a
   comparison on the same CPU (the torch reference runs on the CPU), so it runs with JAX on the CPU too.

The file starts with the device, jax version and the command line, so it can go into
docs/benchmarks.md as it is.
"""
import argparse
import os
import platform
import subprocess
import sys
import time

import jax

from maskformer_jax.bench import train_step as bench_train_step


def _subprocess_part(title, args, deadline, timeout, env=None):
  """Runs `python -m <args>` (with `env` added to the environment); its table lines, or why not."""
  left = deadline - time.monotonic()
  if left < 30:
    return [f"### {title}", "", f"Skipped: the time budget was spent ({left:.0f} s left)."]
  cmd = [sys.executable, "-m", *args]
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=min(timeout, left),
                       env={**os.environ, **(env or {})})
  except subprocess.TimeoutExpired:
    return [f"### {title}", "", f"`{' '.join(args)}` ran out of time (> {min(timeout, left):.0f} s)."]
  body = [line for line in p.stdout.splitlines() if line.startswith("|")]
  if p.returncode or not body:
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
    return [f"### {title}", "", f"`{' '.join(args)}` did not finish (exit {p.returncode}): {tail[0]}"]
  return [f"### {title}", "", f"`python -m {' '.join(args)}`", "", *body]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="accelerator.md")
  p.add_argument("--config", default="configs/coco_panoptic.py")
  p.add_argument("--m2f-config", default="configs/mask2former.py", help="the Mask2Former train step's config")
  p.add_argument("--batch", type=int, default=32, help="global batch of the train step (fill the device)")
  p.add_argument("--size", type=int, nargs=2, default=(512, 512))
  p.add_argument("--variants", nargs="+", default=["float32", "bfloat16", "bfloat16+remat", "bfloat16+points"])
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--profile-variant", default="bfloat16", help="the variant whose costliest ops are listed")
  p.add_argument("--budget-s", type=float, default=450.0, help="stop starting new parts after this")
  args = p.parse_args(argv)
  deadline = time.monotonic() + args.budget_s
  dev = jax.devices()[0]
  lines = [f"## {dev.device_kind} ({jax.device_count()} x {dev.platform}), jax {jax.__version__}, "
           f"{platform.machine()}", "", f"`python -m maskformer_jax.bench.accelerator {' '.join(argv or sys.argv[1:])}`",
           ""]

  def write():
    with open(args.out, "w") as f:
      f.write("\n".join(lines) + "\n")

  lines += [f"### Train step: {args.config}, global batch {args.batch} at {args.size[0]}x{args.size[1]}", ""]
  rows, skipped = [], []
  for variant in args.variants:
    if time.monotonic() > deadline:
      skipped.append(variant)
      continue
    profile = 15 if variant == args.profile_variant else 0
    rows += bench_train_step.measure(args.config, args.batch, args.size, [variant], args.steps, profile,
                                     log=lambda s: print(s, flush=True))
  if rows:
    lines.append(bench_train_step.table(rows, args.batch))
  if skipped:
    lines.append(f"Skipped (time budget spent): {', '.join(skipped)}.")
  lines.append("")
  write()
  lines += _subprocess_part("Matcher", ["maskformer_jax.bench.matcher", "--batch", "8", "64", "--m", "30", "100",
                                        "--peers", "scipy loop"], deadline, 120) + [""]
  write()
  lines += _subprocess_part("Mask2Former's deformable-attention sampling: gathers against matmuls",
                            ["maskformer_jax.bench.msdeform", "--batch", "8"], deadline, 120) + [""]
  write()
  lines += [f"### Mask2Former train step: {args.m2f_config}, global batch {args.batch} at "
            f"{args.size[0]}x{args.size[1]}", ""]
  if deadline - time.monotonic() < 60:
    lines.append(f"Skipped: the time budget was spent ({deadline - time.monotonic():.0f} s left).")
  else:
    lines.append(bench_train_step.table(bench_train_step.measure(
        args.m2f_config, args.batch, args.size, ["bfloat16"], args.steps, log=lambda s: print(s, flush=True)),
        args.batch))
  lines.append("")
  write()
  lines += _subprocess_part("Panoptic post-processing (ours on the device, Hugging Face on the CPU)",
                            ["maskformer_jax.bench.postprocess", "--rounds", "3"], deadline, 120) + [""]
  write()
  # Last: the side by side with PyTorch is a CPU comparison (the torch reference runs on the CPU), so
  # both run on this machine's CPU cores.
  lines += _subprocess_part("Side by side with PyTorch, both on this machine's CPU",
                            ["maskformer_jax.bench.vs_pytorch", "speed", "--decoder", "enc6", "--rounds", "2"],
                            deadline, 400, env={"JAX_PLATFORMS": "cpu"})
  write()
  print("\n".join(lines))
  print(f"written to {args.out}")


if __name__ == "__main__":
  main()
