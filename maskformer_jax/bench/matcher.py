"""Times `matcher.hungarian` against scipy and vmapped optax on the same batches, in one run.

  python -m maskformer_jax.bench.matcher [--batch 8 64] [--m 10 30 100] [--n 100] [--repeats 20]

Cost matrices are uniform random [B, N, M] with a random number (1..M) of valid columns per image at
random positions. The methods are timed interleaved (one call each per round) so machine load hits all
alike; each figure is the median over rounds, and ratios are to ours in the same run. "scipy loop" is
`linear_sum_assignment` per image, including the device-to-host copy of the costs; "host callback" is
`host_hungarian` (the same scipy loop inside the jitted step through `jax.pure_callback`).

On CPU the jitted calls are dispatched synchronously (`jax_cpu_enable_async_dispatch=False`; pass
--async-dispatch to keep JAX's default): a standalone call otherwise hands its work to another thread,
and on a loaded machine that hand-off, not the solver, dominates a millisecond-long call. Inside a
training step the matcher is part of one large computation, so the hand-off is not its cost.
"""
import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from maskformer_jax import matcher


def make_problem(rng, b, n, m):
  cost = rng.random((b, n, m), dtype=np.float32)
  count = rng.integers(1, m + 1, size=b)
  valid = np.zeros((b, m), bool)
  for i, k in enumerate(count):
    valid[i, rng.permutation(m)[:k]] = True
  return jnp.asarray(cost), jnp.asarray(valid)


def scipy_loop(cost, valid):
  cost = np.asarray(cost)  # device -> host
  valid = np.asarray(valid)
  out = np.full(valid.shape, -1, np.int32)
  for b in range(cost.shape[0]):
    cols = np.flatnonzero(valid[b])
    if cols.size:
      out[b, cols] = linear_sum_assignment(cost[b][:, cols].T)[1]
  return out


def total(cost, valid, rows):
  cost, valid, rows = np.asarray(cost, np.float64), np.asarray(valid), np.asarray(rows)
  b, m = np.nonzero(valid)
  assert (rows[b, m] >= 0).all()
  return np.bincount(b, cost[b, rows[b, m], m], minlength=cost.shape[0])


def run(batches, ms, n, repeats, seed=0, peers=("scipy loop", "optax vmap", "host callback")):
  rng = np.random.default_rng(seed)
  methods = {
      "ours": jax.jit(matcher.hungarian),
      "scipy loop": scipy_loop,
      "optax vmap": jax.jit(matcher.optax_hungarian),
      "host callback": jax.jit(matcher.host_hungarian),
  }
  methods = {k: f for k, f in methods.items() if k == "ours" or k in peers}
  rows = []
  for b in batches:
    for m in ms:
      cost, valid = make_problem(rng, b, n, m)
      ref = total(cost, valid, scipy_loop(cost, valid))
      for name, f in methods.items():  # compile, and check every method is exact on this batch
        got = total(cost, valid, jax.block_until_ready(f(cost, valid)))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4, err_msg=name)
      times = {k: [] for k in methods}
      for _ in range(repeats):
        for name, f in methods.items():
          t = time.perf_counter()
          jax.block_until_ready(f(cost, valid))
          times[name].append(time.perf_counter() - t)
      med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
      rows.append(dict(b=b, m=m, **med))
      print(f"B={b} M={m}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in med.items()), flush=True)
  return rows, list(methods)


def table(rows, names):
  head = "| B | M | " + " | ".join(f"{k} ms" + (" (x ours)" if k != "ours" else "") for k in names) + " |"
  lines = [head, "|" + "---|" * (len(names) + 2)]
  for r in rows:
    cells = [f"{r['ours']:.3f}"] + [f"{r[k]:.3f} ({r[k] / r['ours']:.2f})" for k in names if k != "ours"]
    lines.append(f"| {r['b']} | {r['m']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, nargs="+", default=[8, 64])
  p.add_argument("--m", type=int, nargs="+", default=[10, 30, 100])
  p.add_argument("--n", type=int, default=100)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--peers", nargs="*", default=["scipy loop", "optax vmap", "host callback"])
  p.add_argument("--async-dispatch", action="store_true", help="keep JAX's asynchronous CPU dispatch")
  args = p.parse_args()
  jax.config.update("jax_cpu_enable_async_dispatch", args.async_dispatch)
  rows, names = run(args.batch, args.m, args.n, args.repeats, args.seed, tuple(args.peers))
  print(f"\n{platform.node()} {jax.devices()[0].device_kind} jax {jax.__version__}, N={args.n}, "
        f"{'async' if args.async_dispatch else 'sync'} CPU dispatch, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"median of {args.repeats} interleaved rounds, ratio = peer / ours (>1: ours faster)\n")
  print(table(rows, names))


if __name__ == "__main__":
  main()
