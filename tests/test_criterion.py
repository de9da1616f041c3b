"""The set criterion against Hugging Face's MaskFormerLoss (same predictions, targets and matching)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.maskformer.modeling_maskformer import MaskFormerHungarianMatcher, MaskFormerLoss

from maskformer_jax import criterion, points
from maskformer_jax.config import base_config

K, Q, M, H, W, S = 4, 7, 5, 32, 48, 4  # classes, queries, slots, padded size, mask stride


def make_targets(rng, counts, layers=0):
  """segments [B, H, W] with `counts[b]` rectangles (void/padding -1 elsewhere), labels, valid.

  layers > 0: segments [B, H, W, layers], overlapping rectangles (instance targets), each pixel of a
  rectangle in the first layer free there (pixels under more rectangles than layers stay uncovered)."""
  b = len(counts)
  segments = np.full((b, H, W, max(layers, 1)), -1, np.int32)
  labels = np.full((b, M), K, np.int32)
  valid = np.zeros((b, M), bool)
  for i, n in enumerate(counts):
    for m in range(n):
      y0, x0 = rng.integers(0, H - 6), rng.integers(0, W - 6)
      box = segments[i, y0:y0 + rng.integers(3, H - y0), x0:x0 + rng.integers(3, W - x0)]
      if layers:
        todo = np.ones(box.shape[:2], bool)
        for lay in range(layers):
          put = todo & (box[..., lay] < 0)
          box[..., lay][put] = m
          todo &= ~put
      else:
        box[..., 0] = m
      labels[i, m] = rng.integers(0, K)
      valid[i, m] = True
    # A slot whose rectangle got fully painted over keeps a valid empty mask: allowed, as in HF.
  return {"segments": segments if layers else segments[..., 0], "labels": labels, "valid": valid}


def make_layers(rng, b, n_layers):
  return [{"pred_logits": rng.normal(size=(b, Q, K + 1)).astype(np.float32) * 2,
           "pred_masks": rng.normal(size=(b, Q, H // S, W // S)).astype(np.float32) * 3}
          for _ in range(n_layers)]


def hf_targets(batch):
  masks, classes = [], []
  for seg, lab, val in zip(batch["segments"], batch["labels"], batch["valid"]):
    slots = np.flatnonzero(val)
    seg = seg if seg.ndim == 3 else seg[..., None]  # [H, W, layers]; a slot's mask is any layer's
    masks.append(torch.tensor((seg[None] == slots[:, None, None, None]).any(-1).astype(np.float32)))
    classes.append(torch.tensor(lab[slots], dtype=torch.long))
  return masks, classes


def hf_loss(lc):
  matcher = MaskFormerHungarianMatcher(cost_class=lc.cost_class, cost_mask=lc.cost_mask,
                                       cost_dice=lc.cost_dice)
  weights = {"loss_cross_entropy": lc.class_weight, "loss_mask": lc.mask_weight,
             "loss_dice": lc.dice_weight}
  return MaskFormerLoss(num_labels=K, matcher=matcher, weight_dict=weights, eos_coef=lc.eos_coef)


def to_torch(layer):
  return torch.tensor(layer["pred_masks"]), torch.tensor(layer["pred_logits"])


def test_bilinear_upsampling_is_torch_interpolate():
  x = np.random.default_rng(0).normal(size=(2, 3, 5, 7)).astype(np.float32)
  ours = jax.image.resize(jnp.asarray(x), (2, 3, 20, 28), "bilinear", antialias=False)
  ref = torch.nn.functional.interpolate(torch.tensor(x), size=(20, 28), mode="bilinear",
                                        align_corners=False)
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("counts", [(3, 5), (0, 2)])
def test_layer_losses_match_hf_with_hf_matching(counts):
  """Given HF's own assignment, each term equals HF's to 1e-4 (one image may have no targets)."""
  rng = np.random.default_rng(1)
  batch = make_targets(rng, counts)
  layer = make_layers(rng, len(counts), 1)[0]
  lc = base_config().loss
  loss = hf_loss(lc)
  masks, classes = hf_targets(batch)
  pm, pl = to_torch(layer)
  with torch.no_grad():
    ref = loss(pm, pl, masks, classes)
    hf_idx = loss.matcher(pm, pl, masks, classes)
  indices = np.full((len(counts), M), -1, np.int32)
  for b, (qs, ts) in enumerate(hf_idx):
    slots = np.flatnonzero(batch["valid"][b])
    indices[b, slots[ts.numpy()]] = qs.numpy()
  ours = criterion.layer_losses(
      jnp.asarray(layer["pred_logits"]), jnp.asarray(layer["pred_masks"]), batch, jnp.asarray(indices),
      lc, num_masks=criterion.num_masks(batch), ce_norm=criterion.class_weight_sum(batch, Q, lc.eos_coef))
  for ours_name, hf_name in (("loss_ce", "loss_cross_entropy"), ("loss_mask", "loss_mask"),
                             ("loss_dice", "loss_dice")):
    np.testing.assert_allclose(float(ours[ours_name]), float(ref[hf_name]), rtol=1e-4, atol=1e-5,
                               err_msg=ours_name)


@pytest.mark.parametrize("matcher,layers", [("jax", 0), ("scipy", 0), ("jax", 3)])
def test_set_criterion_with_aux_layers_matches_hf(matcher, layers):
  """End to end with our matching: every layer re-matched, each aux layer == HF on that layer alone,
  and the total is the weighted sum with aux layers weighted like the main one (the original).
  layers 3: overlapping targets (instance segmentation), HF given each target's whole mask."""
  rng = np.random.default_rng(2)
  batch = make_targets(rng, (4, 2, 1), layers)
  if layers:  # the targets do overlap, up to 3 deep
    assert ((batch["segments"] >= 0).sum(-1) >= 2).any()
  layers = make_layers(rng, 3, 3)
  lc = base_config().loss
  lc.matcher = matcher
  outputs = dict(layers[-1], aux_outputs=layers[:-1])
  total, terms = jax.jit(lambda o, b: criterion.set_criterion(
      o, b, lc, num_masks=criterion.num_masks(b), rng=jax.random.key(0)))(outputs, batch)
  loss = hf_loss(lc)
  masks, classes = hf_targets(batch)
  expected_total = 0.0
  for suffix, layer in (("", layers[-1]), ("_0", layers[0]), ("_1", layers[1])):
    with torch.no_grad():
      ref = loss(*to_torch(layer), masks, classes)  # HF applied to this layer's outputs alone
    for ours_name, hf_name, wgt in (("loss_ce", "loss_cross_entropy", lc.class_weight),
                                    ("loss_mask", "loss_mask", lc.mask_weight),
                                    ("loss_dice", "loss_dice", lc.dice_weight)):
      np.testing.assert_allclose(float(terms[ours_name + suffix]), float(ref[hf_name]), rtol=1e-4,
                                 atol=1e-5, err_msg=ours_name + suffix)
      expected_total += wgt * float(ref[hf_name])
  np.testing.assert_allclose(float(total), expected_total, rtol=1e-4)
  np.testing.assert_allclose(float(terms["loss"]), float(total))
  np.testing.assert_allclose(float(terms["loss_dice_all"]),
                             sum(float(terms[k]) for k in ("loss_dice", "loss_dice_0", "loss_dice_1")),
                             rtol=1e-6)


def test_no_deep_supervision_uses_main_layer_only():
  rng = np.random.default_rng(3)
  batch = make_targets(rng, (2, 3))
  layers = make_layers(rng, 2, 2)
  lc = base_config().loss
  lc.deep_supervision = False
  total, terms = jax.jit(lambda o: criterion.set_criterion(
      o, batch, lc, num_masks=criterion.num_masks(batch), rng=jax.random.key(0)))(
          dict(layers[1], aux_outputs=layers[:1]))
  assert "loss_ce_0" not in terms
  np.testing.assert_allclose(
      float(total), float(terms["loss_ce"] + 20 * terms["loss_mask"] + terms["loss_dice"]), rtol=1e-6)


@pytest.mark.parametrize("point_sampling", [False, True])
def test_empty_targets_give_a_finite_loss_and_gradient(point_sampling):
  rng = np.random.default_rng(4)
  batch = make_targets(rng, (0, 0))
  layers = make_layers(rng, 2, 2)
  lc = base_config().loss
  lc.point_sampling, lc.num_points = point_sampling, 64
  outputs = dict(layers[1], aux_outputs=layers[:1])

  def f(o):
    return criterion.set_criterion(o, batch, lc, num_masks=criterion.num_masks(batch),
                                   rng=jax.random.key(0))
  (total, terms), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(outputs)
  assert np.isfinite(float(total)) and float(total) > 0
  assert float(terms["loss_mask"]) == 0.0 and float(terms["loss_dice"]) == 0.0
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  # Only no-object targets: the CE is the mean NLL of class K over all queries.
  logp = jax.nn.log_softmax(layers[1]["pred_logits"])[..., K]
  np.testing.assert_allclose(float(terms["loss_ce"]), -float(jnp.mean(logp)), rtol=1e-5)


@pytest.mark.parametrize("layers", [0, 2])
def test_sample_targets_equals_point_sample_of_dense_masks(layers):
  rng = np.random.default_rng(5)
  batch = make_targets(rng, (3, 5), layers)
  coords = jnp.asarray(rng.uniform(-0.05, 1.05, size=(2, M, 50, 2)).astype(np.float32))
  seg = batch["segments"] if layers else batch["segments"][..., None]
  dense = (seg[:, None] == np.arange(M)[None, :, None, None, None]).any(-1).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(criterion.target_masks(jnp.asarray(batch["segments"]), M)), dense)
  np.testing.assert_allclose(np.asarray(criterion.sample_targets(batch["segments"], coords, M)),
                             np.asarray(points.point_sample(dense, coords)), atol=1e-6)


def test_point_sampled_mask_losses():
  """Mask2Former points: focal/dice on the points `points.sample_points_with_uncertainty` picks, with
  bilinearly sampled targets; with uniform points only they roughly estimate the full-res losses
  (zero padding at the borders of the stride-4 logits biases them a little)."""
  rng = np.random.default_rng(6)
  batch = make_targets(rng, (4, 3))
  layer = make_layers(rng, 2, 1)[0]
  lc = base_config().loss
  idx = jnp.asarray(np.array([[0, 2, 4, 6, -1], [5, 3, 1, -1, -1]], np.int32))
  kw = dict(num_masks=criterion.num_masks(batch), ce_norm=criterion.class_weight_sum(batch, Q, 0.1))
  dense = criterion.layer_losses(layer["pred_logits"], layer["pred_masks"], batch, idx, lc, **kw)
  lc.point_sampling, lc.num_points = True, 4096
  for ratio in (0.75, 0.0):
    lc.importance_sample_ratio = ratio
    pts = criterion.layer_losses(layer["pred_logits"], layer["pred_masks"], batch, idx, lc,
                                 rng=jax.random.key(1), **kw)
    src = jnp.take_along_axis(jnp.asarray(layer["pred_masks"]), jnp.maximum(idx, 0)[..., None, None], 1)
    coords = jnp.concatenate([  # each slot draws its own points from the key folded with the slot
        points.sample_points_with_uncertainty(src[:, m:m + 1], jax.random.fold_in(jax.random.key(1), m),
                                              4096, 3.0, ratio) for m in range(M)], axis=1)
    x = points.point_sample(src, coords)
    t = points.point_sample(criterion.target_masks(jnp.asarray(batch["segments"]), M), coords)
    m = np.asarray(idx >= 0)
    focal = (np.asarray(criterion.sigmoid_focal(x, t)).mean(-1) * m).sum() / 7
    dice = (np.asarray(criterion.dice(x, t)) * m).sum() / 7
    np.testing.assert_allclose(float(pts["loss_mask"]), focal, rtol=1e-5)
    np.testing.assert_allclose(float(pts["loss_dice"]), dice, rtol=1e-5)
    np.testing.assert_allclose(float(pts["loss_ce"]), float(dense["loss_ce"]), rtol=1e-6)
  np.testing.assert_allclose(float(pts["loss_mask"]), float(dense["loss_mask"]), rtol=0.15)
  np.testing.assert_allclose(float(pts["loss_dice"]), float(dense["loss_dice"]), rtol=0.15)


def test_split_batch_with_global_normalisers_sums_to_the_full_batch():
  """What gradient accumulation relies on: halves normalised by full-batch num_masks and CE weight sum
  add up to the full-batch loss exactly (matching is per image)."""
  rng = np.random.default_rng(7)
  batch = make_targets(rng, (3, 0, 5, 1))
  layers = make_layers(rng, 4, 2)
  outputs = dict(layers[1], aux_outputs=layers[:1])
  lc = base_config().loss
  norms = dict(num_masks=criterion.num_masks(batch), ce_norm=criterion.class_weight_sum(batch, Q, 0.1))
  loss = jax.jit(lambda o, b: criterion.set_criterion(o, b, lc, rng=None, **norms)[0])
  full = loss(outputs, batch)
  half = lambda t, s: jax.tree.map(lambda x: x[s], t)  # noqa: E731
  parts = [loss(half(outputs, s), half(batch, s)) for s in (slice(0, 2), slice(2, 4))]
  np.testing.assert_allclose(float(parts[0] + parts[1]), float(full), rtol=1e-6)


def test_slotwise_upsampled_losses_and_gradients_equal_the_dense_formula():
  """The slot-by-slot rematerialised computation == all slots upsampled at once, values and grads."""
  rng = np.random.default_rng(8)
  batch = make_targets(rng, (3, 2))
  src = jnp.asarray(rng.normal(size=(2, M, H // S, W // S)).astype(np.float32))
  segments = jnp.asarray(batch["segments"])
  wgt = jnp.asarray(rng.uniform(size=(2, M)).astype(np.float32))

  def slotwise(x):
    focal, dsc = criterion.upsampled_mask_losses(x, segments, 0.25, 2.0)
    return jnp.sum(wgt * (20 * focal + dsc))

  def dense(x):
    up = jax.image.resize(x, (2, M, H, W), "bilinear", antialias=False).reshape(2, M, -1)
    t = criterion.target_masks(segments, M).reshape(2, M, -1)
    return jnp.sum(wgt * (20 * criterion.sigmoid_focal(up, t).mean(-1) + criterion.dice(up, t)))

  (v1, g1), (v2, g2) = jax.jit(jax.value_and_grad(slotwise))(src), jax.jit(jax.value_and_grad(dense))(src)
  np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), atol=1e-6, rtol=1e-4)


def test_mask2former_switches_point_losses_and_point_matching():
  """point_sampling + matcher_num_points: finite loss and gradients, every valid target matched to
  a distinct query, padding slots unmatched."""
  rng = np.random.default_rng(9)
  batch = make_targets(rng, (4, 1))
  layers = make_layers(rng, 2, 2)
  lc = base_config().loss
  lc.point_sampling, lc.num_points, lc.matcher_num_points = True, 64, 128
  outputs = dict(layers[1], aux_outputs=layers[:1])

  @jax.jit
  def run(o):
    loss = lambda o: criterion.set_criterion(  # noqa: E731
        o, batch, lc, num_masks=criterion.num_masks(batch), rng=jax.random.key(3))[0]
    return jax.value_and_grad(loss)(o), criterion.match(o["pred_logits"], o["pred_masks"], batch, lc,
                                                        jax.random.key(4))
  (total, grads), indices = run(outputs)
  assert np.isfinite(float(total)) and all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  indices = np.asarray(indices)
  for b in range(2):
    matched = indices[b][batch["valid"][b]]
    assert (matched >= 0).all() and len(set(matched.tolist())) == len(matched)
    assert (indices[b][~batch["valid"][b]] == -1).all()


@pytest.mark.parametrize("point_sampling", [False, True])
def test_unused_slots_are_skipped_and_used_slots_unchanged(point_sampling):
  """Per-slot mask losses with `active`: slots no image uses get exactly 0 (they are skipped, not
  computed), the others equal the all-slots computation, and so do the gradients of the matched sum."""
  rng = np.random.default_rng(9)
  batch = make_targets(rng, (3, 1))
  src = jnp.asarray(rng.normal(size=(2, M, H // S, W // S)).astype(np.float32))
  segments = jnp.asarray(batch["segments"])
  active = jnp.asarray(batch["valid"])
  lc = base_config().loss
  lc.num_points = 64

  def losses(x, act):
    if point_sampling:
      return criterion.point_mask_losses(x, segments, jax.random.key(3), lc, act)
    return criterion.upsampled_mask_losses(x, segments, 0.25, 2.0, act)

  def matched_sum(x, act):
    focal, dsc = losses(x, act)
    return jnp.sum(jnp.where(active, 20 * focal + dsc, 0.0))

  (f_all, d_all), (f_act, d_act) = losses(src, None), losses(src, active)
  used = np.asarray(jnp.any(active, axis=0))
  assert used.any() and not used.all()
  assert np.all(np.asarray(f_all)[:, ~used] > 0)  # what the skip avoids computing is not zero
  np.testing.assert_array_equal(np.asarray(f_act)[:, ~used], 0.0)
  np.testing.assert_array_equal(np.asarray(d_act)[:, ~used], 0.0)
  np.testing.assert_allclose(np.asarray(f_act)[:, used], np.asarray(f_all)[:, used], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(d_act)[:, used], np.asarray(d_all)[:, used], rtol=1e-6)
  g_all = jax.grad(matched_sum)(src, None)
  g_act = jax.grad(matched_sum)(src, active)
  np.testing.assert_allclose(np.asarray(g_act), np.asarray(g_all), rtol=1e-5, atol=1e-7)
