"""Batched exact bipartite matching and the MaskFormer matching costs (docs/reference.md section 2).

`hungarian` solves one assignment problem per image inside the jitted step (no host round trip);
`host_hungarian` runs scipy through `jax.pure_callback` for comparison only. Both follow
`linear_sum_assignment` on the rectangular [queries, targets] cost, as the original and Hugging Face's
`MaskFormerHungarianMatcher` do: min(#queries, #targets) pairs per image, so with more targets than
queries every query gets one target and the remaining targets stay unmatched (-1).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from maskformer_jax import points as points_lib
from maskformer_jax import registry

# Non-finite policy: NaN, +inf and -inf costs all become BIG (as Hugging Face's matcher maps them to the
# dtype's max), and finite costs are clamped to [-BIG, BIG]: such a pair is only used when no assignment
# avoids it, and the solver's sums of a few hundred costs stay finite in float32.
BIG = 1e30


def sanitize_costs(cost):
  """The non-finite policy above, applied elementwise."""
  cost = jnp.where(jnp.isfinite(cost), cost, BIG)
  return jnp.clip(cost, -BIG, BIG)


def _first(mask, axis):
  """Index of the first True along `axis` (its size if none): a plain min-reduction, which XLA:CPU runs
  several times faster than argmin/argmax (a variadic reduce)."""
  io = jax.lax.broadcasted_iota(jnp.int32, mask.shape, axis % mask.ndim)
  return jnp.min(jnp.where(mask, io, mask.shape[axis]), axis=axis)


def _at(x, j):
  """x[b, j[b]] for x [B, K]: a one-element gather per image, which XLA fuses into its consumers."""
  return jnp.take_along_axis(x, j[:, None], axis=1)[:, 0]


def _row(c, i):
  """c[b, :, i[b]] for c [B, N, M]: the costs of target i against every query (a strided gather, so the
  costs are never transposed)."""
  return jnp.take_along_axis(c, i[:, None, None], axis=2)[:, :, 0]


def _auction_start(c, valid, rounds):
  """A few Jacobi auction rounds with zero margin (JV's "augmenting row reduction", all free rows at once).

  Each free row bids for its cheapest column (reduced by v) and raises its price by the gap to its second
  cheapest; the highest bid wins and the previous owner is freed. This keeps what the augmenting-path
  phase needs -- every assigned row sits on a column of minimum reduced cost, v <= 0, v = 0 on free
  columns -- while settling most rows in a few wide [B, N, M] passes. Without a margin it can cycle on ties,
  hence a fixed number of rounds; the exact phase finishes whatever is left.
  """
  bsz, n, m = c.shape
  inf = jnp.array(jnp.inf, c.dtype)
  ar_m = jnp.arange(m, dtype=jnp.int32)
  ar_n = jnp.arange(n, dtype=jnp.int32)
  zero_n = jnp.zeros_like(c[:, :, 0])  # built from c so that under shard_map it varies like c
  v = zero_n
  col4row = jnp.zeros_like(c[:, 0, :], jnp.int32) - 1
  row4col = zero_n.astype(jnp.int32) - 1
  lower = (ar_m[None, :] < ar_m[:, None])[None]  # [1, i, i']: i' < i
  for _ in range(rounds):
    free = valid & (col4row < 0)
    w = c - v[:, :, None]  # [B, N, M]
    w1 = w.min(axis=1)
    j1 = _first(w == w1[:, None, :], axis=1)
    w2 = jnp.where(ar_n[:, None] == j1[:, None, :], inf, w).min(axis=1)
    inc = jnp.where(w2 < inf, w2 - w1, 0.0)
    # Among free rows bidding for one column the largest raise wins (the lowest row on ties).
    rival = (j1[:, :, None] == j1[:, None, :]) & free[:, None, :]
    better = (inc[:, None, :] > inc[:, :, None]) | ((inc[:, None, :] == inc[:, :, None]) & lower)
    win = free & ~(rival & better).any(axis=2)
    bids = (j1[:, None, :] == ar_n[:, None]) & win[:, None, :]  # [B, N, M]
    owner = jnp.max(jnp.where(bids, ar_m, -1), axis=2)
    taken = owner >= 0
    v = v - jnp.sum(jnp.where(bids, inc[:, None, :], 0.0), axis=2)
    lost = (col4row >= 0) & jnp.take_along_axis(taken, jnp.maximum(col4row, 0), axis=1)
    col4row = jnp.where(win, j1, jnp.where(lost, -1, col4row))
    row4col = jnp.where(taken, owner, row4col)
  return v, col4row, row4col


def _solve(c, valid, rounds=None):
  """Shortest augmenting paths (Jonker-Volgenant / scipy's LAPJV variant) for c [B, N, M].

  Every valid column gets a row, so an image needs at most as many usable (finite-cost) rows as valid
  columns; `hungarian` pads to ensure it. +inf entries are never used (never relaxed, never settled).
  Solved as the transposed M x N problem: rows are targets, columns queries. Every image runs its own state machine and all images advance
  together, one Dijkstra step per `while_loop` iteration, so the number of sequential iterations is the
  largest per-image count of Dijkstra steps, not the sum over the batch. One step scans one row against
  all N columns at once ([B, N] vector work). Duals: v per column (0 for free columns, so the rectangular
  problem stays exact); u of an assigned row is implicit (c - v on its tight assigned edge).
  Returns col4row [B, M] (column of each row, -1 for invalid rows).
  """
  bsz, n, m = c.shape
  dtype = c.dtype
  if rounds is None:
    # A round costs a few [B, N, M] passes (~40 Dijkstra steps at M=60 on CPU); only near-square
    # problems, whose searches are long, repay a second one (measured at N=100: M=60 best with 1, M=100 2).
    rounds = 2 if 4 * m > 3 * n else 1
  inf = jnp.array(jnp.inf, dtype)
  ar_m = jnp.arange(m, dtype=jnp.int32)
  ar_n = jnp.arange(n, dtype=jnp.int32)

  v, col4row, row4col = _auction_start(c, valid, rounds)

  # Augmenting keeps every assigned row assigned, so the roots are the rows left free here, in order:
  # after_free[b, i] is the first of them after row i (m if none), looked up once per augmentation.
  free_idx = jnp.where(valid & (col4row < 0), ar_m, m)
  after_free = jnp.concatenate(
      [jax.lax.cummin(free_idx, axis=1, reverse=True)[:, 1:], jnp.full_like(free_idx[:, :1], m)], axis=1)
  first = free_idx.min(axis=1)
  cur, active = jnp.minimum(first, m - 1), first < m
  zero_n = jnp.zeros_like(c[:, :, 0])  # loop-carry starts derived from c: shard_map-varying like it
  zb = zero_n[:, 0]
  state = dict(
      v=v, col4row=col4row, row4col=row4col,
      cur=cur,  # root row of the current search
      i=cur,  # row scanned next
      ci=_row(c, cur),  # its costs
      ui=zb,  # its dual u (0 for a root: a constant offset of all distances)
      active=active,  # the image still has free valid rows
      aug=zb != 0,  # walking an augmenting path back to the root
      jaug=zb.astype(jnp.int32),  # column being re-assigned on that walk
      spc=zero_n + inf,  # shortest path cost to each column
      path=zero_n.astype(jnp.int32),  # predecessor row of each column
      sc=zero_n != 0,  # scanned columns
      minval=zb, steps=jnp.int32(0))

  def step(s):
    search = s["active"] & ~s["aug"]
    sc = s["sc"]
    # Dijkstra: relax row i against every unscanned column, then settle the closest column
    # (preferring a free one on ties, as scipy does, so searches end early).
    r = (s["minval"] - s["ui"])[:, None] + s["ci"] - s["v"]
    upd = search[:, None] & ~sc & (r < s["spc"])
    spc = jnp.where(upd, r, s["spc"])
    path = jnp.where(upd, s["i"][:, None], s["path"])
    masked = jnp.where(sc, inf, spc)
    lowest = masked.min(axis=1)
    key = jnp.where(masked == lowest[:, None], jnp.where(s["row4col"] < 0, ar_n, ar_n + n), 2 * n)
    j = key.min(axis=1) % n
    hit = ar_n == j[:, None]
    nxt = _at(s["row4col"], j)
    sink = search & (nxt < 0)
    cont = search & (nxt >= 0)
    minval = jnp.where(search, lowest, s["minval"])
    sc = sc | (hit & search[:, None])
    # Free column reached: update v of the settled columns (u stays implicit), then walk back.
    v = jnp.where(sink[:, None] & sc, s["v"] - (minval[:, None] - spc), s["v"])
    aug = s["aug"] | sink
    jaug = jnp.where(sink, j, s["jaug"])
    ja = ar_n == jaug[:, None]
    pi = _at(path, jaug)
    row4col = jnp.where(ja & aug[:, None], pi[:, None], s["row4col"])
    ia = ar_m == pi[:, None]
    old = _at(s["col4row"], pi)
    col4row = jnp.where(ia & aug[:, None], jaug[:, None], s["col4row"])
    done = aug & (pi == s["cur"])
    jaug = jnp.where(aug, old, jaug)
    aug = aug & ~done
    # Path complete: start the next free row.
    nxt_root = _at(after_free, s["cur"])
    root, more = jnp.minimum(nxt_root, m - 1), nxt_root < m
    i = jnp.where(cont, nxt, jnp.where(done, root, s["i"]))
    ci = _row(c, i)  # one gather serves the next scan and the implicit u of a reached row
    ui = jnp.where(cont, _at(ci, j) - _at(v, j), jnp.where(done, 0.0, s["ui"]))
    return dict(
        v=v, col4row=col4row, row4col=row4col, cur=jnp.where(done, root, s["cur"]),
        i=i, ci=ci, ui=ui,
        active=jnp.where(done, more, s["active"]), aug=aug, jaug=jaug,
        spc=jnp.where(done[:, None], inf, spc), path=path, sc=sc & ~done[:, None],
        minval=jnp.where(done, 0.0, minval), steps=s["steps"] + 1)

  # At most m augmentations of at most m search and m walk steps each: a guard, never reached.
  limit = 2 * m * m + 2 * m + 1
  state = jax.lax.while_loop(lambda s: s["active"].any() & (s["steps"] < limit), step, state)
  return jnp.where(valid, state["col4row"], -1)


def hungarian(cost, valid):
  """Minimum-cost matching of min(N, n) pairs per image, n = the image's number of valid columns.

  Exact: the same total as scipy's `linear_sum_assignment` on the valid sub-matrix [N, n], which is what
  the original and Hugging Face's matcher solve. With n <= N every valid column (target) gets a distinct
  row (query); with n > N every row gets a distinct valid column and the other n - N valid columns stay
  unmatched. Invalid columns take no part at all. Pure JAX with static shapes: works under jit, vmap
  and shard_map. Costs go through `sanitize_costs` (non-finite policy above). Solver: an auction start,
  then batched shortest augmenting paths (`_solve`); its speed and how it grows with M are in
  docs/benchmarks.md ("Matcher").

  When M > N, M - N dummy rows are appended, of which image b may use exactly max(0, n_b - N) (cost 0;
  the others +inf, i.e. absent). An image with n > N then has a square problem: every real row is used,
  the n - N columns left on dummies are its unmatched targets, and as every dummy costs the same the
  optimum over the real pairs is scipy's. No "very large" cost enters the sums, so float32 stays exact.

  Args:
    cost: float [B, N, M] (any N, M).
    valid: bool [B, M], real targets.
  Returns:
    int32 [B, M]: the row matched to each column; -1 for invalid and unmatched columns.
  """
  cost = jnp.asarray(cost)
  b, n, m = cost.shape
  if m == 0:
    return jnp.zeros((b, 0), jnp.int32)
  dtype = cost.dtype if cost.dtype in (jnp.float32, jnp.float64) else jnp.float32
  # The assignment is piecewise constant in the costs: no gradient (and none through the while_loop).
  cost = sanitize_costs(jax.lax.stop_gradient(cost).astype(dtype))
  valid = jnp.asarray(valid, bool)
  if m <= n:  # n_b <= M <= N: every valid column is matched, no dummies needed
    return _solve(cost, valid).astype(jnp.int32)
  excess = jnp.sum(valid, axis=1, dtype=jnp.int32) - n  # valid columns that cannot all be matched
  usable = jnp.arange(m - n, dtype=jnp.int32)[None, :] < excess[:, None]  # [B, M - N]
  dummy = jnp.where(usable, jnp.zeros((), dtype), jnp.array(jnp.inf, dtype))
  padded = jnp.concatenate([cost, jnp.broadcast_to(dummy[:, :, None], (b, m - n, m))], axis=1)
  rows = _solve(padded, valid)  # [B, M] over M rows: N real, then the dummies
  return jnp.where(rows < n, rows, -1).astype(jnp.int32)


def optax_hungarian(cost, valid):
  """Peer for benchmarks and tests: vmapped `optax.assignment.hungarian_algorithm`, invalid columns at a
  constant cost (which keeps the real columns exact only when N >= M, hence the check)."""
  if np.shape(cost)[1] < np.shape(cost)[2]:
    raise ValueError(f"optax_hungarian needs N >= M, got cost of shape {np.shape(cost)}")

  def one(cost_t, valid):
    cost_t = jnp.where(valid[:, None], cost_t, 0.0)
    rows, cols = optax.assignment.hungarian_algorithm(cost_t)
    out = jnp.full((cost_t.shape[0],), -1, jnp.int32).at[rows].set(cols.astype(jnp.int32))
    return jnp.where(valid, out, -1)

  cost = sanitize_costs(jnp.asarray(cost, jnp.float32))
  return jax.vmap(one)(jnp.swapaxes(cost, 1, 2), valid)


def _scipy_batch(cost, valid):
  from scipy.optimize import linear_sum_assignment
  cost = np.asarray(cost, np.float64)
  valid = np.asarray(valid, bool)
  out = np.full(valid.shape, -1, np.int32)
  for b in range(cost.shape[0]):
    cols = np.flatnonzero(valid[b])
    if cols.size == 0:
      continue
    # Rows of the transposed problem are the targets; with more targets than queries only N of them
    # come back (the optimum of the untransposed [N, n] problem, which HF solves).
    ts, qs = linear_sum_assignment(cost[b][:, cols].T)
    out[b, cols[ts]] = qs
  return out


def host_hungarian(cost, valid):
  """Same contract as `hungarian` (unmatched targets -1 too), solved by scipy on the host (for
  comparison only)."""
  cost = sanitize_costs(jnp.asarray(cost, jnp.float32))
  valid = jnp.asarray(valid, bool)
  shape = jax.ShapeDtypeStruct(valid.shape, jnp.int32)
  return jax.pure_callback(_scipy_batch, shape, cost, valid, vmap_method="sequential")


# config.loss.matcher -> solver(cost [B, N, M], valid [B, M]) -> int32 [B, M].
MATCHERS = {"jax": hungarian, "scipy": host_hungarian}


def make_matcher(name):
  """`config.loss.matcher` -> solver: "jax" (in the step) or "scipy" (host callback, for comparison)."""
  return registry.get(MATCHERS, name, "loss.matcher")


def _mm(a, b):
  """[B, Q, P] x [B, M, P] -> [B, Q, M] in full float32 (TPUs default to bfloat16 passes)."""
  return jnp.einsum("bqp,bmp->bqm", a, b, precision=jax.lax.Precision.HIGHEST)


def matching_points(rng, batch, num_points):
  """Uniform random points [B, P, 2] in [0, 1] as (x, y), one set per image (Mask2Former's matcher)."""
  return jax.random.uniform(rng, (batch, num_points, 2), jnp.float32)


def matching_costs(pred_logits, pred_masks, labels, target_masks, valid, *, cost_class, cost_mask,
                   cost_dice, alpha=0.25, gamma=2.0, num_points=0, rng=None, mask_loss="focal"):
  """Pairwise matching cost [B, Q, M]: class + sigmoid focal + dice, as MaskFormer's matcher, or with
  `mask_loss="bce"` class + binary cross-entropy + dice, as Mask2Former's.

  Focal and dice are written as matrix products over pixels, so nothing of size [B, Q, M, H, W] exists.
  Without points, `target_masks` ([B, M, Ht, Wt], Ht = s * h) are nearest-downsampled by striding, which is
  what torch's `interpolate(mode="nearest")` does for integer factors. With `num_points > 0`, predictions
  (at their size) and targets (at theirs) are bilinearly sampled at the same uniform random points of each
  image (Mask2Former). Invalid columns are 0. Inputs are stop-gradiented: matching is not differentiated.
  """
  pred_logits, pred_masks = jax.tree.map(
      lambda x: jax.lax.stop_gradient(jnp.asarray(x, jnp.float32)), (pred_logits, pred_masks))
  target_masks = jax.lax.stop_gradient(jnp.asarray(target_masks))  # any dtype: bool, uint8, float
  b, q, h, w = pred_masks.shape
  m = labels.shape[1]

  prob = jax.nn.softmax(pred_logits, axis=-1)
  labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  c_class = -jnp.take_along_axis(prob, jnp.broadcast_to(labels[:, None, :], (b, q, m)), axis=2)

  if num_points > 0:
    if rng is None:
      raise ValueError("num_points > 0 needs rng")
    coords = matching_points(rng, b, num_points)[:, None]  # shared by all queries and targets
    x = points_lib.point_sample(pred_masks, coords)  # [B, Q, P]
    t = points_lib.point_sample(target_masks.astype(jnp.float32), coords)  # [B, M, P]
  else:
    ht, wt = target_masks.shape[-2:]
    sh, sw = ht // h, wt // w
    if sh * h != ht or sw * w != wt or sh < 1 or sw < 1:
      raise ValueError(f"target size {(ht, wt)} is not an integer multiple of prediction size {(h, w)}")
    x = pred_masks.reshape(b, q, h * w)
    t = target_masks[:, :, ::sh, ::sw].reshape(b, m, h * w).astype(jnp.float32)  # stride, then convert
  t = jnp.where(valid[:, :, None], t, 0.0)  # padded slots: whatever they hold, no NaN can come out
  npix = x.shape[-1]

  p = jax.nn.sigmoid(x)
  pos, neg = jax.nn.softplus(-x), jax.nn.softplus(x)  # BCE(x, 1), BCE(x, 0)
  if mask_loss == "focal":
    pos, neg = alpha * (1.0 - p) ** gamma * pos, (1.0 - alpha) * p ** gamma * neg
  elif mask_loss != "bce":
    raise ValueError(f"mask_loss={mask_loss!r} is not one of ['bce', 'focal'].")
  # sum_p pos*t + neg*(1-t) = (pos-neg) @ t + sum_p neg: one matrix product.
  c_mask = (_mm(pos - neg, t) + neg.sum(-1)[:, :, None]) / npix
  numer = 2.0 * _mm(p, t)
  denom = p.sum(-1)[:, :, None] + t.sum(-1)[:, None, :]
  c_dice = 1.0 - (numer + 1.0) / (denom + 1.0)

  cost = cost_mask * c_mask + cost_class * c_class + cost_dice * c_dice
  return jnp.where(valid[:, None, :], cost, 0.0)
