"""Point sampling against torch grid_sample, and Mask2Former's uncertainty-guided point choice."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from maskformer_jax import points


def torch_point_sample(masks, coords):
  """detectron2's point_sample: grid_sample at 2 * coords - 1, align_corners=False, zero padding."""
  b, n, h, w = masks.shape
  coords = np.broadcast_to(coords, (b, n) + coords.shape[2:])
  grid = torch.tensor(2 * coords - 1).reshape(b * n, -1, 1, 2)
  out = torch.nn.functional.grid_sample(torch.tensor(masks).reshape(b * n, 1, h, w), grid,
                                        mode="bilinear", padding_mode="zeros", align_corners=False)
  return out.reshape(b, n, -1).numpy()


@pytest.mark.parametrize("shared", [False, True])
def test_point_sample_matches_grid_sample(shared):
  rng = np.random.default_rng(0)
  masks = rng.normal(size=(2, 3, 5, 7)).astype(np.float32)
  p = 200
  coords = rng.uniform(-0.2, 1.2, (2, 1 if shared else 3, p, 2)).astype(np.float32)  # some outside
  coords[..., :8, :] = np.array([[0, 0], [1, 1], [0, 1], [1, 0], [0.5, 0.5], [0.1, 0.9],
                                 [1 / 14, 1 / 10], [13 / 14, 9 / 10]], np.float32)  # corners, centres
  got = np.asarray(jax.jit(points.point_sample)(masks, coords))
  assert got.shape == (2, 3, p)
  np.testing.assert_allclose(got, torch_point_sample(masks, coords), rtol=1e-5, atol=1e-6)


def test_point_sample_is_differentiable_in_the_masks():
  masks = jnp.ones((1, 2, 4, 4))
  coords = jnp.full((1, 2, 3, 2), 0.5)
  g = jax.grad(lambda m: points.point_sample(m, coords).sum())(masks)
  np.testing.assert_allclose(g.sum(), 6.0, rtol=1e-6)  # bilinear weights sum to 1 per sample


def test_uncertain_points_concentrate_where_logits_are_near_zero():
  h, w = 32, 32
  logits = np.full((2, 3, h, w), 10.0, np.float32)
  logits[..., :, : w // 2] = 0.0  # left half uncertain (|logit| = 0)
  n_points, ratio = 256, 0.75
  f = jax.jit(points.sample_points_with_uncertainty, static_argnums=(2, 3, 4))
  coords = np.asarray(f(jnp.asarray(logits), jax.random.key(0), n_points, 3.0, ratio))
  assert coords.shape == (2, 3, n_points, 2)
  assert ((coords >= 0) & (coords <= 1)).all()
  k = int(ratio * n_points)
  # ~1.5 * n_points oversampled points land in the left half, more than k: all importance points do
  # (the boundary column at x in [0.5 - 1/64, 0.5] interpolates with the right half).
  assert (coords[:, :, :k, 0] <= 0.5 - 1 / 64).all()
  # The random remainder is uniform: about half of it is on the right.
  right = (coords[:, :, k:, 0] > 0.5).mean()
  assert 0.3 < right < 0.7
  # Deterministic in the key, different for another key.
  again = np.asarray(f(jnp.asarray(logits), jax.random.key(0), n_points, 3.0, ratio))
  np.testing.assert_array_equal(coords, again)
  other = np.asarray(f(jnp.asarray(logits), jax.random.key(1), n_points, 3.0, ratio))
  assert not np.array_equal(coords, other)


def test_uncertain_points_without_random_part_and_no_gradient():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(1, 2, 8, 8)), jnp.float32)
  coords = points.sample_points_with_uncertainty(logits, jax.random.key(2), 16, 2.0, 1.0)
  assert coords.shape == (1, 2, 16, 2)
  u = -np.abs(np.asarray(points.point_sample(logits, coords)))
  # The chosen points are the 16 most uncertain of the 32 drawn: sorted by uncertainty, descending.
  assert (np.diff(u, axis=-1) <= 1e-6).all()
  g = jax.grad(lambda l: points.sample_points_with_uncertainty(l, jax.random.key(2), 16, 2.0, 1.0).sum())(
      logits)
  assert (np.asarray(g) == 0).all()
