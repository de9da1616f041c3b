"""Point sampling of mask logits (Mask2Former): bilinear lookups like torch `grid_sample`, and
uncertainty-guided importance sampling of the points the mask loss is computed on."""
import jax
import jax.numpy as jnp


def point_sample(masks, coords):
  """Bilinear samples of `masks` [B, N, h, w] at `coords` [B, N or 1, P, 2] in [0, 1] as (x, y).

  Matches torch `grid_sample(masks, 2 * coords - 1, align_corners=False)` with zero padding: pixel centres
  sit at (i + 0.5) / size, and neighbours outside the mask contribute 0. Coordinates shared by all N
  (second dim 1) are gathered once per image. Returns [B, N, P].
  """
  b, n, h, w = masks.shape
  masks = masks.reshape(b, n, h * w)
  x = coords[..., 0] * w - 0.5
  y = coords[..., 1] * h - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0
  fy = y - y0
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)

  def gather(idx):
    if idx.shape[1] == 1 and n != 1:
      return jax.vmap(lambda m, i: jnp.take(m, i, axis=-1))(masks, idx[:, 0])
    return jnp.take_along_axis(masks, jnp.broadcast_to(idx, (b, n, idx.shape[-1])), axis=-1)

  out = 0.0
  for dy, wy in ((0, 1.0 - fy), (1, fy)):
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
      xi = x0 + dx
      yi = y0 + dy
      inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
      idx = jnp.where(inside, yi * w + xi, 0)
      out = out + gather(idx) * jnp.where(inside, wy * wx, 0.0)
  return out


def sample_points_with_uncertainty(logits, rng, num_points, oversample_ratio, importance_sample_ratio):
  """Mask2Former's `get_uncertain_point_coords_with_randomness` for `logits` [B, N, h, w].

  Draws num_points * oversample_ratio uniform points, keeps the importance_sample_ratio * num_points most
  uncertain ones (uncertainty = -|logit|) and fills the rest with fresh uniform points. Returns
  coords [B, N, num_points, 2] in [0, 1] as (x, y), without gradient.
  """
  b, n = logits.shape[:2]
  logits = jax.lax.stop_gradient(logits)
  num_sampled = int(num_points * oversample_ratio)
  num_uncertain = int(importance_sample_ratio * num_points)
  num_random = num_points - num_uncertain
  k_over, k_rand = jax.random.split(rng)
  coords = jax.random.uniform(k_over, (b, n, num_sampled, 2), jnp.float32)
  uncertainty = -jnp.abs(point_sample(logits, coords))
  _, idx = jax.lax.top_k(uncertainty, num_uncertain)
  picked = jnp.take_along_axis(coords, idx[..., None], axis=2)
  if num_random > 0:
    picked = jnp.concatenate([picked, jax.random.uniform(k_rand, (b, n, num_random, 2), jnp.float32)], axis=2)
  return jax.lax.stop_gradient(picked)
