"""Batched exact bipartite matching and the MaskFormer matching costs (../shared/SPEC.md section 2).

`hungarian` solves one assignment problem per image inside the jitted step (no host round trip);
`host_hungarian` runs scipy through `jax.pure_callback` for comparison only.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maskformer_jax import points as points_lib

# Non-finite policy: NaN, +inf and -inf costs all become BIG (as Hugging Face's matcher maps them to the
# dtype's max), and finite costs are clamped to [-BIG, BIG]: such a pair is only used when no assignment
# avoids it, and the solver's sums of a few hundred costs stay finite in float32.
BIG = 1e30


def sanitize_costs(cost):
  """The non-finite policy above, applied elementwise."""
  cost = jnp.where(jnp.isfinite(cost), cost, BIG)
  return jnp.clip(cost, -BIG, BIG)


def _optax_one(cost_t, valid):
  """One [M, N] problem (targets as rows) with optax; invalid rows get a constant cost (exact)."""
  cost_t = jnp.where(valid[:, None], cost_t, 0.0)
  rows, cols = optax.assignment.hungarian_algorithm(cost_t)
  out = jnp.full((cost_t.shape[0],), -1, jnp.int32).at[rows].set(cols.astype(jnp.int32))
  return jnp.where(valid, out, -1)


def hungarian(cost, valid):
  """Minimum-cost assignment of every valid column (target) to a distinct row (query).

  Args:
    cost: float [B, N, M], N >= M.
    valid: bool [B, M], real targets.
  Returns:
    int32 [B, M]: the row assigned to each column, -1 for invalid columns.
  """
  cost = sanitize_costs(jnp.asarray(cost, jnp.float32))
  return jax.vmap(_optax_one)(jnp.swapaxes(cost, 1, 2), valid)


def _scipy_batch(cost, valid):
  from scipy.optimize import linear_sum_assignment
  cost = np.asarray(cost, np.float64)
  valid = np.asarray(valid, bool)
  out = np.full(valid.shape, -1, np.int32)
  for b in range(cost.shape[0]):
    cols = np.flatnonzero(valid[b])
    if cols.size == 0:
      continue
    # Rows of the transposed problem are the targets: row_ind == arange(len(cols)).
    _, qs = linear_sum_assignment(cost[b][:, cols].T)
    out[b, cols] = qs
  return out


def host_hungarian(cost, valid):
  """Same contract as `hungarian`, solved by scipy on the host (for comparison only)."""
  cost = sanitize_costs(jnp.asarray(cost, jnp.float32))
  valid = jnp.asarray(valid, bool)
  shape = jax.ShapeDtypeStruct(valid.shape, jnp.int32)
  return jax.pure_callback(_scipy_batch, shape, cost, valid, vmap_method="sequential")


def make_matcher(name):
  """`config.loss.matcher` -> solver: "jax" (in the step) or "scipy" (host callback)."""
  if name == "jax":
    return hungarian
  if name == "scipy":
    return host_hungarian
  raise ValueError(f"unknown matcher {name!r}; expected 'jax' or 'scipy'")


def _mm(a, b):
  """[B, Q, P] x [B, M, P] -> [B, Q, M] in full float32 (TPUs default to bfloat16 passes)."""
  return jnp.einsum("bqp,bmp->bqm", a, b, precision=jax.lax.Precision.HIGHEST)


def matching_costs(pred_logits, pred_masks, labels, target_masks, valid, *, cost_class, cost_mask,
                   cost_dice, alpha=0.25, gamma=2.0, num_points=0, rng=None):
  """Pairwise matching cost [B, Q, M]: class + sigmoid focal + dice, as MaskFormer's matcher.

  Focal and dice are written as matrix products over pixels, so nothing of size [B, Q, M, H, W] exists.
  Without points, `target_masks` ([B, M, Ht, Wt], Ht = s * h) are nearest-downsampled by striding, which is
  what torch's `interpolate(mode="nearest")` does for integer factors. With `num_points > 0`, predictions
  (at their size) and targets (at theirs) are bilinearly sampled at the same uniform random points of each
  image (Mask2Former). Invalid columns are 0. Inputs are stop-gradiented: matching is not differentiated.
  """
  pred_logits, pred_masks, target_masks = jax.tree.map(
      lambda x: jax.lax.stop_gradient(jnp.asarray(x, jnp.float32)), (pred_logits, pred_masks, target_masks))
  b, q, h, w = pred_masks.shape
  m = labels.shape[1]
  target_masks = jnp.where(valid[:, :, None, None], target_masks, 0.0)

  prob = jax.nn.softmax(pred_logits, axis=-1)
  labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  c_class = -jnp.take_along_axis(prob, jnp.broadcast_to(labels[:, None, :], (b, q, m)), axis=2)

  if num_points > 0:
    if rng is None:
      raise ValueError("num_points > 0 needs rng")
    coords = jax.random.uniform(rng, (b, 1, num_points, 2), jnp.float32)
    x = points_lib.point_sample(pred_masks, coords)  # [B, Q, P]
    t = points_lib.point_sample(target_masks, coords)  # [B, M, P]
  else:
    ht, wt = target_masks.shape[-2:]
    sh, sw = ht // h, wt // w
    if sh * h != ht or sw * w != wt or sh < 1 or sw < 1:
      raise ValueError(f"target size {(ht, wt)} is not an integer multiple of prediction size {(h, w)}")
    x = pred_masks.reshape(b, q, h * w)
    t = target_masks[:, :, ::sh, ::sw].reshape(b, m, h * w)
  npix = x.shape[-1]

  p = jax.nn.sigmoid(x)
  focal_pos = alpha * (1.0 - p) ** gamma * jax.nn.softplus(-x)  # BCE(x, 1)
  focal_neg = (1.0 - alpha) * p ** gamma * jax.nn.softplus(x)  # BCE(x, 0)
  # sum_p pos*t + neg*(1-t) = (pos-neg) @ t + sum_p neg: one matrix product.
  c_mask = (_mm(focal_pos - focal_neg, t) + focal_neg.sum(-1)[:, :, None]) / npix
  numer = 2.0 * _mm(p, t)
  denom = p.sum(-1)[:, :, None] + t.sum(-1)[:, None, :]
  c_dice = 1.0 - (numer + 1.0) / (denom + 1.0)

  cost = cost_mask * c_mask + cost_class * c_class + cost_dice * c_dice
  return jnp.where(valid[:, None, :], cost, 0.0)
