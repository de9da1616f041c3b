"""Times `ms_deform_attn` (the deformable-attention sampling core) by method, forward and forward+backward.

  python -m maskformer_jax.bench.msdeform [--batch 1] [--size 512] [--dim 256] [--heads 8] [--points 4]
                                          [--methods gather matmul] [--repeats 5]

The shape is one Mask2Former pixel-decoder layer: an input of size x size gives levels at strides 32,
16 and 8 (64x64, 32x32, 16x16 for 512), every position of every level is a query, and locations are
uniform over [-0.1, 1.1] (some samples fall outside and read zeros). "fwd+bwd" is the gradient of a
random projection of the output w.r.t. value, locations and attention weights. Each (method, pass) is
timed in its own block of `--repeats` calls, not interleaved: on a CPU, the matmul method's ~1 GB of
buffers allocated and freed every call slows whatever runs next (page faults), which interleaving would
charge to the gather. Figures are medians; "first call" includes compilation. "max abs diff" checks
the methods agree on these inputs (forward output against the first method's).
"""
import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from maskformer_jax.models.msdeform import METHODS, ms_deform_attn


def make_inputs(batch, size, dim, heads, points, seed=0):
  shapes = tuple((size // s, size // s) for s in (32, 16, 8))  # HF order: highest stride first
  s = sum(h * w for h, w in shapes)
  k = jax.random.split(jax.random.key(seed), 4)
  value = jax.random.normal(k[0], (batch, s, heads, dim // heads))
  loc = jax.random.uniform(k[1], (batch, s, heads, len(shapes), points, 2), minval=-0.1, maxval=1.1)
  attn = jax.nn.softmax(jax.random.normal(k[2], (batch, s, heads, len(shapes) * points)), -1)
  attn = attn.reshape(batch, s, heads, len(shapes), points)
  cot = jax.random.normal(k[3], (batch, s, dim))
  return shapes, value, loc, attn, cot


def _fns(method, shapes):
  fwd = jax.jit(lambda v, l, a: ms_deform_attn(v, shapes, l, a, method))
  loss = lambda v, l, a, c: jnp.sum(ms_deform_attn(v, shapes, l, a, method) * c)  # noqa: E731
  bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return fwd, bwd


def run(batch, size, dim, heads, points, methods, repeats):
  shapes, value, loc, attn, cot = make_inputs(batch, size, dim, heads, points)
  fns, compile_s, ref, diff = {}, {}, None, {}
  for m in methods:
    fwd, bwd = _fns(m, shapes)
    t = time.perf_counter()
    out = jax.block_until_ready(fwd(value, loc, attn))
    compile_s[(m, "fwd")] = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(bwd(value, loc, attn, cot))
    compile_s[(m, "fwd+bwd")] = time.perf_counter() - t
    ref = out if ref is None else ref
    diff[m] = float(jnp.max(jnp.abs(out - ref)))
    fns[(m, "fwd")] = lambda f=fwd: f(value, loc, attn)
    fns[(m, "fwd+bwd")] = lambda f=bwd: f(value, loc, attn, cot)
  times = {k: [] for k in fns}
  for k, f in fns.items():  # one after the other: see the module docstring
    for _ in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t)
  return shapes, [dict(method=m, pass_=p, diff=diff[m], first_s=compile_s[(m, p)],
                       ms=1e3 * float(np.median(times[(m, p)]))) for m, p in fns]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--size", type=int, default=512, help="input image side; levels at strides 32, 16, 8")
  p.add_argument("--dim", type=int, default=256)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--points", type=int, default=4)
  p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)
  shapes, rows = run(args.batch, args.size, args.dim, args.heads, args.points, args.methods, args.repeats)
  dev = jax.devices()[0]
  q = sum(h * w for h, w in shapes)
  print(f"ms_deform_attn on {dev.device_kind} ({dev.platform}), jax {jax.__version__}, {platform.machine()}: "
        f"batch {args.batch}, levels {' '.join(f'{h}x{w}' for h, w in shapes)} ({q} queries), "
        f"{args.heads} heads x {args.dim // args.heads} channels, {args.points} points\n")
  print("| method | pass | max abs diff | first call (s) | median (ms) |")
  print("|---|---|---:|---:|---:|")
  for r in rows:
    print(f"| {r['method']} | {r['pass_']} | {r['diff']:.1e} | {r['first_s']:.2f} | {r['ms']:.1f} |")
  return rows


if __name__ == "__main__":
  main()
