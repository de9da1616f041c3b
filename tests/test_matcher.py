"""Exact assignment against scipy, and the matching costs against Hugging Face's MaskFormer matcher.

The reference for the assignment is scipy's `linear_sum_assignment` on the rectangular valid sub-matrix
[N, n], as HF's matcher calls it: min(N, n) pairs, so with more valid columns than rows some columns
stay unmatched (-1).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.optimize import linear_sum_assignment

from maskformer_jax import matcher

# A few fixed shapes (B, N, M) keep compilation out of the property tests.
SHAPES = [(3, 6, 4), (2, 5, 5), (4, 9, 1), (2, 12, 7), (1, 3, 3)]
WIDE = [(3, 4, 6), (2, 1, 5), (2, 5, 9), (4, 7, 8)]  # M > N: images may have more targets than rows
hungarian = jax.jit(matcher.hungarian)


def scipy_total(cost, valid):
  """Per-image optimum of the valid columns, in float64, after the documented non-finite policy."""
  cost = np.asarray(matcher.sanitize_costs(jnp.asarray(cost, jnp.float32)), np.float64)
  out = []
  for c, v in zip(cost, valid):
    cols = np.flatnonzero(v)
    if cols.size == 0:
      out.append(0.0)
      continue
    r, q = linear_sum_assignment(c[:, cols])  # HF's orientation: [N queries, n targets]
    out.append(c[r, cols[q]].sum())
  return np.array(out), cost


def check(cost, valid, rows, rtol=1e-5):
  """min(N, n) one-to-one pairs on the valid columns, -1 elsewhere, total cost equal to scipy's."""
  rows = np.asarray(rows)
  valid = np.asarray(valid)
  assert rows.dtype == np.int32 and rows.shape == valid.shape
  ref, sane = scipy_total(cost, valid)
  for b in range(rows.shape[0]):
    assert (rows[b][~valid[b]] == -1).all()
    cols = np.flatnonzero(valid[b])
    got = rows[b][cols]
    assert ((got >= -1) & (got < cost.shape[1])).all()
    matched = got >= 0
    assert matched.sum() == min(cost.shape[1], cols.size), "not min(N, n) pairs"
    got, cols = got[matched], cols[matched]
    assert len(set(got.tolist())) == got.size, "a row used twice"
    total = sane[b][got, cols].sum()
    scale = np.abs(sane[b]).max() * max(valid[b].sum(), 1) if sane[b].size else 0.0
    assert abs(total - ref[b]) <= rtol * scale + 1e-6, (b, total, ref[b])


def matrices(kind, shape, rng):
  if kind == "random":
    return rng.random(shape)
  if kind == "integer":  # many ties
    return rng.integers(0, 4, shape).astype(float)
  if kind == "constant":
    return np.full(shape, rng.normal())
  if kind == "dynamic":  # huge dynamic range, both signs
    return rng.choice([-1.0, 1.0], shape) * 10.0 ** rng.uniform(-20, 20, shape)
  if kind == "negative":
    return -rng.random(shape) * 100
  raise ValueError(kind)


@settings(max_examples=300)
@given(shape=st.sampled_from(SHAPES + WIDE), kind=st.sampled_from(["random", "integer", "constant",
                                                                    "dynamic", "negative"]),
       seed=st.integers(0, 2**32 - 1), valid_p=st.sampled_from([0.0, 0.5, 0.8, 1.0]))
def test_hungarian_matches_scipy(shape, kind, seed, valid_p):
  """N >= M, and M > N (WIDE): images with n <= N match every valid column, with n > N every row."""
  rng = np.random.default_rng(seed)
  cost = matrices(kind, shape, rng).astype(np.float32)
  valid = rng.random(shape[::2]) < valid_p
  check(cost, valid, hungarian(cost, valid))


@pytest.mark.parametrize("n,m", [(100, 30), (100, 100), (40, 40), (100, 150), (50, 100)])
def test_hungarian_realistic_sizes(n, m):
  rng = np.random.default_rng(n + m)
  cost = rng.random((6, n, m)).astype(np.float32)
  valid = np.arange(m) < rng.integers(0, m + 1, (6, 1))
  valid[0] = True  # all valid, N == M when n == m, more targets than queries when m > n
  valid[1] = False  # all invalid
  valid[2] = np.arange(m) < min(n, m)  # exactly N targets when m > n
  rows = hungarian(cost, valid)
  check(cost, valid, rows)
  assert (np.asarray(rows)[1] == -1).all()


@pytest.mark.parametrize("seed,shape", [(0, (6, 100, 30)), (8, (3, 100, 150))], ids=["tall", "wide"])
def test_integer_costs_are_exact(seed, shape):
  """Many ties: scipy's total exactly, for COCO-like shapes and ADE20K's (150 slots, 100 queries: every
  query matched)."""
  rng = np.random.default_rng(seed)
  cost = rng.integers(0, 3, shape).astype(np.float32)
  valid = np.ones((shape[0], shape[2]), bool)
  rows = np.asarray(hungarian(cost, valid))
  ref, _ = scipy_total(cost, valid)
  assert ((rows >= 0).sum(1) == min(shape[1:])).all()
  got = np.where(rows >= 0, np.take_along_axis(cost, np.maximum(rows, 0)[:, None, :], axis=1)[:, 0], 0)
  np.testing.assert_array_equal(got.sum(-1), ref)


def test_padded_columns_do_not_matter():
  rng = np.random.default_rng(1)
  cost = rng.random((2, 12, 7)).astype(np.float32)
  valid = np.array([[1, 0, 1, 1, 0, 0, 1]] * 2, bool)
  garbage = cost.copy()
  garbage[:, :3, ~valid[0]] = np.array([np.nan, -1e9, np.inf])[:, None]  # anything in padded columns
  a = np.asarray(hungarian(cost, valid))
  np.testing.assert_array_equal(a, hungarian(garbage, valid))
  check(cost, valid, a)


def test_non_finite_policy():
  """NaN, +inf and -inf are all a large finite cost: used only when no assignment avoids them."""
  valid = np.array([[True, True, False]])
  cost = np.array([[[np.nan, 5.0, 0], [1.0, -np.inf, 0], [np.inf, 7.0, 0]]], np.float32)  # [1, N=3, M=3]
  np.testing.assert_array_equal(hungarian(cost, valid), [[1, 0, -1]])  # 1 + 5 avoids every non-finite
  forced = np.full((1, 3, 3), np.nan, np.float32)
  forced[0, 2, 0] = 0.0
  np.testing.assert_array_equal(hungarian(forced, valid)[0, 0], 2)  # the one finite pair is used
  rng = np.random.default_rng(2)
  cost = rng.random((2, 12, 7)).astype(np.float32)
  cost[rng.random(cost.shape) < 0.3] = np.nan
  cost[rng.random(cost.shape) < 0.1] = -np.inf
  cost[rng.random(cost.shape) < 0.1] = np.inf
  valid = rng.random((2, 7)) < 0.8
  check(cost, valid, hungarian(cost, valid))
  wide = np.full((1, 2, 3), np.nan, np.float32)  # more targets than rows: non-finite pairs avoided too
  wide[0, 0, 2], wide[0, 1, 0] = 1.0, 2.0
  np.testing.assert_array_equal(hungarian(wide, np.ones((1, 3), bool)), [[1, -1, 0]])


def test_deterministic_and_degenerate_shapes():
  rng = np.random.default_rng(3)
  cost = rng.integers(0, 2, (2, 12, 7)).astype(np.float32)
  valid = np.ones((2, 7), bool)
  np.testing.assert_array_equal(hungarian(cost, valid), hungarian(cost, valid))
  assert matcher.hungarian(np.zeros((2, 4, 0), np.float32), np.ones((2, 0), bool)).shape == (2, 0)
  wide = np.array([[[3.0, 1.0, 2.0]]], np.float32)  # one row, three targets: the cheapest is matched
  np.testing.assert_array_equal(hungarian(wide, np.ones((1, 3), bool)), [[-1, 0, -1]])
  np.testing.assert_array_equal(hungarian(wide, np.array([[True, False, True]])), [[-1, -1, 0]])


def test_gradients_flow_around_the_matcher():
  """A loss that gathers matched predictions is differentiable even if the costs were not detached."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.random((2, 12, 7)), jnp.float32)
  valid = np.ones((2, 7), bool)

  def loss(x):
    rows = matcher.hungarian(x * 2.0, valid)
    return jnp.take_along_axis(x, rows[:, None, :], axis=1).sum()

  g = np.asarray(jax.jit(jax.grad(loss))(x))
  rows = np.asarray(hungarian(x, valid))
  expect = np.zeros(x.shape, np.float32)
  for b in range(2):
    expect[b, rows[b], np.arange(7)] = 1.0
  np.testing.assert_array_equal(g, expect)


@pytest.mark.parametrize("n,m", [(9, 6), (4, 7)])
def test_vmap_over_an_extra_batch_dim(n, m):
  rng = np.random.default_rng(4)
  cost = rng.random((3, 4, n, m)).astype(np.float32)
  valid = rng.random((3, 4, m)) < 0.7
  got = np.asarray(jax.jit(jax.vmap(matcher.hungarian))(cost, valid))
  for k in range(3):
    np.testing.assert_array_equal(got[k], hungarian(cost[k], valid[k]))
  check(cost.reshape(12, n, m), valid.reshape(12, m), got.reshape(12, m))


@pytest.mark.parametrize("n,m", [(20, 8), (6, 10)])
def test_shard_map_over_8_devices(n, m):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  spec = jax.sharding.PartitionSpec("data")
  f = jax.jit(jax.shard_map(matcher.hungarian, mesh=mesh, in_specs=(spec, spec), out_specs=spec))
  rng = np.random.default_rng(5)
  cost = rng.random((16, n, m)).astype(np.float32)
  valid = rng.random((16, m)) < 0.8
  shard = jax.sharding.NamedSharding(mesh, spec)
  got = f(jax.device_put(cost, shard), jax.device_put(valid, shard))
  np.testing.assert_array_equal(got, hungarian(cost, valid))
  check(cost, valid, got)


def test_host_and_optax_peers_agree():
  rng = np.random.default_rng(6)
  cost = rng.random((2, 12, 7)).astype(np.float32)
  valid = rng.random((2, 7)) < 0.7
  check(cost, valid, jax.jit(matcher.host_hungarian)(cost, valid))
  check(cost, valid, jax.jit(matcher.optax_hungarian)(cost, valid))
  wide = rng.random((3, 4, 9)).astype(np.float32)  # more targets than rows: scipy's unmatched too
  wide_valid = np.array([[True] * 9, [True] * 3 + [False] * 6, [True, False] * 4 + [True]])
  host = np.asarray(jax.jit(matcher.host_hungarian)(wide, wide_valid))
  check(wide, wide_valid, host)
  np.testing.assert_array_equal(host, hungarian(wide, wide_valid))  # continuous costs: one optimum
  with pytest.raises(ValueError, match="N >= M"):
    matcher.optax_hungarian(wide, wide_valid)


def test_matcher_registry():
  assert matcher.MATCHERS == {"jax": matcher.hungarian, "scipy": matcher.host_hungarian}
  for name, solver in matcher.MATCHERS.items():
    assert matcher.make_matcher(name) is solver
  with pytest.raises(ValueError, match=r"loss\.matcher='auction' is not one of \['jax', 'scipy'\]"):
    matcher.make_matcher("auction")


# ---------------------------------------------------------------- matching costs vs Hugging Face


def random_batch(seed, b=2, q=7, k=5, m=4, h=6, w=8, s=4):
  rng = np.random.default_rng(seed)
  return dict(
      pred_logits=(rng.normal(size=(b, q, k + 1)) * 2).astype(np.float32),
      pred_masks=(rng.normal(size=(b, q, h, w)) * 3).astype(np.float32),
      labels=rng.integers(0, k, (b, m)).astype(np.int32),
      target_masks=(rng.random((b, m, s * h, s * w)) < 0.4).astype(np.float32),
      valid=np.array([[1] * m, [1] * (m - 2) + [0] * 2], bool)[:b])


def hf_cost_matrices(batch, weights):
  """The cost matrices `MaskFormerHungarianMatcher` hands to scipy, captured on their way."""
  import torch
  from transformers.models.maskformer import modeling_maskformer as mm
  captured = []
  real = mm.linear_sum_assignment

  def spy(c):
    captured.append(np.asarray(c))
    return real(c)

  mm.linear_sum_assignment = spy
  try:
    hf = mm.MaskFormerHungarianMatcher(**weights)
    v = batch["valid"]
    hf(torch.tensor(batch["pred_masks"]), torch.tensor(batch["pred_logits"]),
       [torch.tensor(t[vb]) for t, vb in zip(batch["target_masks"], v)],
       [torch.tensor(l[vb]).long() for l, vb in zip(batch["labels"], v)])
  finally:
    mm.linear_sum_assignment = real
  return captured


@pytest.mark.parametrize("weights", [dict(cost_class=1.0, cost_mask=20.0, cost_dice=1.0),
                                     dict(cost_class=2.0, cost_mask=0.0, cost_dice=0.0),
                                     dict(cost_class=0.0, cost_mask=1.0, cost_dice=0.0),
                                     dict(cost_class=0.0, cost_mask=0.0, cost_dice=1.0)])
@pytest.mark.parametrize("stride", [1, 4])
def test_costs_match_hugging_face(weights, stride):
  batch = random_batch(0, s=stride)
  ours = np.asarray(jax.jit(functools.partial(matcher.matching_costs, **weights))(**batch))
  assert ours.shape == (2, 7, 4) and np.isfinite(ours).all()
  for b, ref in enumerate(hf_cost_matrices(batch, weights)):
    np.testing.assert_allclose(ours[b][:, batch["valid"][b]], ref, rtol=1e-5, atol=1e-5)
    assert (ours[b][:, ~batch["valid"][b]] == 0).all()


def test_costs_accept_boolean_targets_and_ignore_padded_slots():
  batch = random_batch(5)
  weights = dict(cost_class=1.0, cost_mask=20.0, cost_dice=1.0)
  ref = np.asarray(matcher.matching_costs(**batch, **weights))
  batch["target_masks"] = batch["target_masks"] > 0.5
  np.testing.assert_array_equal(matcher.matching_costs(**batch, **weights), ref)
  batch["target_masks"] = batch["target_masks"].astype(np.float32)
  batch["target_masks"][~batch["valid"]] = np.nan  # garbage in padded slots
  batch["labels"][~batch["valid"]] = 5  # the no-object index K
  got = np.asarray(matcher.matching_costs(**batch, **weights))
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("s", [1, 2, 4, 8])
def test_target_downsampling_is_torch_nearest(s):
  """The project's striding (`criterion.target_masks` for the criterion's matching, and the one inside
  `matching_costs`) is HF's `interpolate(mode="nearest")` for every integer factor, non-square sizes."""
  import torch
  from maskformer_jax import criterion
  rng = np.random.default_rng(s)
  segments = rng.integers(-1, 4, (2, 24, 40)).astype(np.int32)  # -1: void
  full = np.asarray(criterion.target_masks(jnp.asarray(segments), 4))  # [B, M, 24, 40]
  ref = torch.nn.functional.interpolate(torch.tensor(full), size=(24 // s, 40 // s), mode="nearest")
  np.testing.assert_array_equal(np.asarray(criterion.target_masks(jnp.asarray(segments), 4, s)),
                                ref.numpy())
  batch = random_batch(s, h=24 // s, w=40 // s, s=1)
  weights = dict(cost_class=1.0, cost_mask=20.0, cost_dice=1.0)
  strided = matcher.matching_costs(**dict(batch, target_masks=full), **weights)
  np.testing.assert_allclose(strided, matcher.matching_costs(**dict(batch, target_masks=ref.numpy()),
                                                             **weights), rtol=1e-6, atol=1e-6)


def test_costs_reject_non_integer_stride():
  batch = random_batch(1)
  batch["target_masks"] = batch["target_masks"][..., :-1]
  with pytest.raises(ValueError, match="integer multiple"):
    matcher.matching_costs(**batch, cost_class=1.0, cost_mask=1.0, cost_dice=1.0)


def test_point_sampled_costs_match_torch():
  """Mask2Former style: the same uniform points for predictions and targets, HF's pairwise formulas."""
  import torch
  from transformers.models.maskformer import modeling_maskformer as mm
  batch = random_batch(2)
  rng = jax.random.key(7)
  weights = dict(cost_class=1.0, cost_mask=20.0, cost_dice=1.0)
  ours = np.asarray(matcher.matching_costs(**batch, **weights, num_points=64, rng=rng))
  coords = np.asarray(matcher.matching_points(rng, 2, 64))  # [B, P, 2]
  for b in range(2):
    v = batch["valid"][b]
    grid = torch.tensor(2 * coords[b] - 1)[None, :, None, :]  # [1, P, 1, 2]
    sample = lambda x: torch.nn.functional.grid_sample(
        torch.tensor(x)[None], grid, align_corners=False)[0, :, :, 0]
    p, t = sample(batch["pred_masks"][b]), sample(batch["target_masks"][b][v])
    cls = -torch.tensor(batch["pred_logits"][b]).softmax(-1)[:, torch.tensor(batch["labels"][b][v]).long()]
    ref = 20 * mm.pair_wise_sigmoid_focal_loss(p, t) + cls + mm.pair_wise_dice_loss(p, t)
    np.testing.assert_allclose(ours[b][:, v], ref.numpy(), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="rng"):
    matcher.matching_costs(**batch, **weights, num_points=8)


def test_costs_are_not_differentiated():
  batch = random_batch(3)
  g = jax.grad(lambda x: matcher.matching_costs(
      batch["pred_logits"], x, batch["labels"], batch["target_masks"], batch["valid"],
      cost_class=1.0, cost_mask=20.0, cost_dice=1.0).sum())(batch["pred_masks"])
  assert (np.asarray(g) == 0).all()


def test_costs_then_matching_end_to_end_agrees_with_hugging_face():
  import torch
  from transformers.models.maskformer import modeling_maskformer as mm
  batch = random_batch(4, b=2, q=9, m=5)
  weights = dict(cost_class=1.0, cost_mask=20.0, cost_dice=1.0)
  cost = matcher.matching_costs(**batch, **weights)
  rows = np.asarray(hungarian(cost, batch["valid"]))
  v = batch["valid"]
  hf = mm.MaskFormerHungarianMatcher(**weights)(
      torch.tensor(batch["pred_masks"]), torch.tensor(batch["pred_logits"]),
      [torch.tensor(t[vb]) for t, vb in zip(batch["target_masks"], v)],
      [torch.tensor(l[vb]).long() for l, vb in zip(batch["labels"], v)])
  for b, (qi, ti) in enumerate(hf):
    np.testing.assert_array_equal(rows[b][v[b]][ti.numpy()], qi.numpy())
