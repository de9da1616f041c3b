"""Mask2Former's criterion (BCE + dice on sampled points, matching costs on sampled points) against Hugging
Face's Mask2FormerLoss and Mask2FormerHungarianMatcher.

Both sides draw random points (ours from JAX keys, HF's from torch.rand), so the comparison fixes them:
the same uniform matching points for each image, and the same loss points for every matched mask of an
image. How the loss points are chosen (uncertainty-guided importance sampling) is compared on its own,
by feeding HF's sampler the uniform draws ours makes.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Mask2FormerConfig
from transformers.models.mask2former import modeling_mask2former as hf_m2f

from maskformer_jax import criterion, matcher, points
from maskformer_jax.config import base_config

sys.path.insert(0, os.path.dirname(__file__))
from test_criterion import K, Q, hf_targets, make_layers, make_targets  # noqa: E402

P = 96  # points a mask (oversampled 3x, 3/4 of them by uncertainty)


def m2f_loss_config():
  lc = base_config().loss
  lc.mask_loss, lc.class_weight, lc.mask_weight, lc.dice_weight = "bce", 2.0, 5.0, 5.0
  lc.cost_class, lc.cost_mask, lc.cost_dice = 2.0, 5.0, 5.0
  lc.point_sampling, lc.num_points, lc.matcher_num_points = True, P, P
  return lc


def hf_loss(lc):
  config = Mask2FormerConfig(num_labels=K, no_object_weight=lc.eos_coef, train_num_points=lc.num_points,
                             oversample_ratio=lc.oversample_ratio, importance_sample_ratio=lc.importance_sample_ratio,
                             class_weight=lc.class_weight, mask_weight=lc.mask_weight, dice_weight=lc.dice_weight)
  weights = {"loss_cross_entropy": lc.class_weight, "loss_mask": lc.mask_weight, "loss_dice": lc.dice_weight}
  return hf_m2f.Mask2FormerLoss(config, weights)


@pytest.mark.parametrize("layers", [0, 3])
def test_loss_and_matching_match_hf_on_fixed_points(monkeypatch, layers):
  """Three images (4, 2 and 0 targets, void around them), a main and two auxiliary layers, each
  re-matched: every term of every layer within 1e-4 of HF's, the matchings equal, the weighted total
  equal to HF's weight_dict applied to its terms. layers 3: the targets overlap (the COCO instance
  recipe's), in up to 3 layers of `segments`; HF gets each target's whole mask."""
  rng = np.random.default_rng(0)
  batch = make_targets(rng, (4, 2, 0), layers)
  assert not layers or ((batch["segments"] >= 0).sum(-1) >= 2).any()  # they do overlap
  layers = make_layers(rng, 3, 3)
  lc = m2f_loss_config()
  b = len(batch["valid"])
  match_points = rng.uniform(size=(b, lc.matcher_num_points, 2)).astype(np.float32)
  loss_points = rng.uniform(size=(b, lc.num_points, 2)).astype(np.float32)

  # Ours: the matching points of each image, and the loss points of each image for all its masks.
  monkeypatch.setattr(matcher, "matching_points", lambda key, n, p: jnp.asarray(match_points))
  monkeypatch.setattr(points, "sample_points_with_uncertainty",
                      lambda logits, key, *a: jnp.broadcast_to(jnp.asarray(loss_points)[:, None],
                                                               (logits.shape[0], logits.shape[1], P, 2)))
  outputs = dict(layers[-1], aux_outputs=layers[:-1])
  total, terms = jax.jit(lambda o, bt: criterion.set_criterion(
      o, bt, lc, num_masks=criterion.num_masks(bt), rng=jax.random.key(0)))(outputs, batch)
  ours_indices = [np.asarray(criterion.match(jnp.asarray(layer["pred_logits"]), jnp.asarray(layer["pred_masks"]),
                                             batch, lc, jax.random.key(1))) for layer in layers]

  # HF: its matcher calls torch.rand(1, P, 2) once per image, in order; its loss samples points for
  # the matched masks concatenated image by image.
  calls = {"n": 0}

  def fixed_rand(*shape, **kw):
    assert tuple(shape) == (1, lc.matcher_num_points, 2), shape
    i, calls["n"] = calls["n"] % b, calls["n"] + 1
    return torch.from_numpy(match_points[i][None])

  matched = [min(Q, int(v.sum())) for v in batch["valid"]]

  def fixed_loss_points(self, logits, *a):
    assert logits.shape[0] == sum(matched)
    return torch.cat([torch.from_numpy(loss_points[i]).expand(n, P, 2) for i, n in enumerate(matched)])

  monkeypatch.setattr(torch, "rand", fixed_rand)
  monkeypatch.setattr(hf_m2f.Mask2FormerLoss, "sample_points_using_uncertainty", fixed_loss_points)
  loss = hf_loss(lc)
  masks, classes = hf_targets(batch)

  def hf_layer(layer):
    return torch.tensor(layer["pred_masks"]), torch.tensor(layer["pred_logits"])

  aux = [{"masks_queries_logits": m, "class_queries_logits": c} for m, c in map(hf_layer, layers[:-1])]
  with torch.no_grad():
    ref = loss(*hf_layer(layers[-1]), masks, classes, auxiliary_predictions=aux)
    hf_indices = [loss.matcher(*hf_layer(layer), masks, classes) for layer in layers]
  assert calls["n"] == 2 * len(layers) * b  # the loss's matching, then ours above

  for layer, (ours, theirs) in enumerate(zip(ours_indices, hf_indices)):
    for i, (qs, ts) in enumerate(theirs):
      slots = np.flatnonzero(batch["valid"][i])
      expected = np.full(ours.shape[1], -1)
      expected[slots[ts.numpy()]] = qs.numpy()
      np.testing.assert_array_equal(ours[i], expected, err_msg=f"layer {layer} image {i}")

  names = {"loss_ce": "loss_cross_entropy", "loss_mask": "loss_mask", "loss_dice": "loss_dice"}
  weights = {"loss_ce": lc.class_weight, "loss_mask": lc.mask_weight, "loss_dice": lc.dice_weight}
  expected_total = 0.0
  for ours_suffix, hf_suffix in (("", ""), ("_0", "_0"), ("_1", "_1")):
    for ours_name, hf_name in names.items():
      want = float(ref[hf_name + hf_suffix])
      got = float(terms[ours_name + ours_suffix])
      assert abs(got - want) <= 1e-4 * max(1.0, abs(want)), (ours_name + ours_suffix, got, want)
      expected_total += weights[ours_name] * want
  assert len(ref) == 9
  np.testing.assert_allclose(float(total), expected_total, rtol=1e-5)
  # The terms are not trivially equal across layers (each layer has its own predictions).
  assert len({round(float(terms[k]), 4) for k in ("loss_mask", "loss_mask_0", "loss_mask_1")}) == 3


def test_importance_sampling_matches_hf_given_the_same_uniform_draws(monkeypatch):
  """points.sample_points_with_uncertainty against HF's sample_points_using_uncertainty: HF is handed the
  oversampled and the fresh uniform points ours draws from its key, and keeps the same ones."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 12, 10)).astype(np.float32) * 3
  key = jax.random.key(7)
  ours = np.asarray(points.sample_points_with_uncertainty(jnp.asarray(logits), key, P, 3.0, 0.75))
  k_over, k_rand = jax.random.split(key)
  n_unc = int(0.75 * P)
  draws = [np.asarray(jax.random.uniform(k_over, (2, 3, 3 * P, 2))).reshape(6, 3 * P, 2),
           np.asarray(jax.random.uniform(k_rand, (2, 3, P - n_unc, 2))).reshape(6, P - n_unc, 2)]
  monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.from_numpy(draws.pop(0).copy()))
  loss = hf_loss(m2f_loss_config())
  theirs = loss.sample_points_using_uncertainty(torch.tensor(logits.reshape(6, 1, 12, 10)),
                                                loss.calculate_uncertainty, P, 3.0, 0.75).numpy()
  assert not draws
  # top-k order aside (neither side promises one), the same points are kept for every mask
  for r, (o, t) in enumerate(zip(ours.reshape(6, P, 2), theirs)):
    np.testing.assert_array_equal(o[n_unc:], t[n_unc:])
    np.testing.assert_array_equal(o[:n_unc][np.lexsort(o[:n_unc].T)], t[:n_unc][np.lexsort(t[:n_unc].T)],
                                  err_msg=f"mask {r}")


def test_bce_cost_and_upsampled_bce_loss():
  """The 'bce' matching cost equals HF's pair_wise_sigmoid_cross_entropy_loss; with points off, the 'bce'
  mask loss is torch's binary_cross_entropy_with_logits on the bilinearly upsampled prediction."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, 5, 6, 8)).astype(np.float32) * 3
  t = (rng.uniform(size=(1, 3, 6, 8)) < 0.4).astype(np.float32)
  labels, valid = np.zeros((1, 3), np.int32), np.ones((1, 3), bool)
  ours = matcher.matching_costs(np.zeros((1, 5, 2), np.float32), x, labels, t, valid, cost_class=0.0,
                                cost_mask=1.0, cost_dice=0.0, mask_loss="bce")
  ref = hf_m2f.pair_wise_sigmoid_cross_entropy_loss(torch.tensor(x[0].reshape(5, -1)), torch.tensor(t[0].reshape(3, -1)))
  np.testing.assert_allclose(np.asarray(ours[0]), ref.numpy(), atol=1e-5)
  focal = matcher.matching_costs(np.zeros((1, 5, 2), np.float32), x, labels, t, valid, cost_class=0.0,
                                 cost_mask=1.0, cost_dice=0.0)
  assert float(jnp.abs(focal - ours).max()) > 1e-2  # the choice matters

  segments = rng.integers(-1, 2, size=(1, 24, 32)).astype(np.int32)
  src = rng.normal(size=(1, 2, 6, 8)).astype(np.float32)
  bce, dsc = criterion.upsampled_mask_losses(jnp.asarray(src), jnp.asarray(segments), 0.25, 2.0, mask_loss="bce")
  up = torch.nn.functional.interpolate(torch.tensor(src), size=(24, 32), mode="bilinear", align_corners=False)
  for m in range(2):
    tgt = torch.tensor((segments == m).astype(np.float32))
    want = torch.nn.functional.binary_cross_entropy_with_logits(up[:, m], tgt)
    np.testing.assert_allclose(float(bce[0, m]), float(want), rtol=1e-5)
    want_dice = hf_m2f.dice_loss(up[:, m].flatten(1), tgt.flatten(1), 1)
    np.testing.assert_allclose(float(dsc[0, m]), float(want_dice), rtol=1e-5)
