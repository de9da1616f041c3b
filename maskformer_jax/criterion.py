"""The MaskFormer set criterion (docs/reference.md section 2), on static shapes inside the jitted step.

Per decoder layer: matching costs -> exact assignment (no gradient) -> cross-entropy over all queries
(no-object weight `eos_coef`) + sigmoid focal (MaskFormer) or binary cross-entropy (Mask2Former:
`loss.mask_loss`) and dice on the matched (query, target) pairs. Deep
supervision re-matches every auxiliary layer and weights it like the main one (the original's
`aux_weight_dict`). Targets stay compact: `segments` [B, H, W] (one target a pixel: panoptic, semantic) or
[B, H, W, L] (instance targets, which overlap: a pixel in up to L of them; slot m's mask is the OR over
the layers), and the binary masks are built on device only where needed.

Normalisation is global, so the loss does not depend on how the batch is split over devices, hosts or
micro-batches: focal/dice sums are divided by `num_masks`, the number of valid targets in the global
batch (>= 1); the original divides by the per-worker average of that count and then DDP averages the
gradients over the workers, which is the same thing. The CE is torch's weighted mean
sum(w * nll) / sum(w) taken over the global batch (the original takes it per worker and averages over
the workers; identical on one worker, and identical in expectation otherwise).

Against Hugging Face's MaskFormerLoss (tests/test_criterion.py): the same terms to 1e-4. Its
`get_num_masks` is the original's (all-reduce, / world size, clamp 1); its matcher's nearest
interpolation of the targets by an integer factor is our striding `segments[:, ::s, ::s]`; its aux
losses call the same loss on each layer with the same num_masks, as the original (HF's deviation is in
the model, which feeds the aux heads un-normalised decoder states; our model uses the shared norm).

More targets than queries (M > Q slots, and images with n > Q real targets) follow HF, i.e. scipy on
the rectangular [Q, n] cost: Q pairs are matched, so every query has a real class target and none is
no-object; the n - Q unmatched targets (index -1 while valid) add nothing to the CE, focal or dice sums,
but still count in `num_masks` (HF's `get_num_masks` counts every target label, matched or not).
"""
import jax
import jax.numpy as jnp

from maskformer_jax import matcher as matcher_lib
from maskformer_jax import points as points_lib

sg = jax.lax.stop_gradient


def num_masks(batch):
  """The global number of target masks, at least 1 (a float32 scalar); unmatched targets count too."""
  return jnp.maximum(jnp.sum(batch["valid"].astype(jnp.float32)), 1.0)


def class_weight_sum(batch, num_queries, eos_coef):
  """sum(w) of the CE over the global batch, known before matching: the assignment matches
  min(#targets, Q) queries per image (weight 1), the others are no-object (weight eos_coef)."""
  n = jnp.minimum(jnp.sum(batch["valid"], axis=1).astype(jnp.float32), num_queries)
  return jnp.sum(n + (num_queries - n) * eos_coef)


def sigmoid_focal(logits, targets, alpha=0.25, gamma=2.0):
  """Elementwise sigmoid focal loss (RetinaNet), as the original/HF `sigmoid_focal_loss`."""
  p = jax.nn.sigmoid(logits)
  ce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  p_t = p * targets + (1 - p) * (1 - targets)
  loss = ce * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
  return loss


def sigmoid_bce(logits, targets, alpha=None, gamma=None):
  """Elementwise binary cross-entropy with logits (Mask2Former's mask loss; alpha, gamma unused)."""
  del alpha, gamma
  return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


# config.loss.mask_loss -> the elementwise mask term f(logits, targets, alpha, gamma), averaged over the
# pixels or points of each mask; the matcher's mask cost follows the same choice.
MASK_LOSSES = {"focal": sigmoid_focal, "bce": sigmoid_bce}


def dice(logits, targets):
  """Per-mask dice loss 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1) over the last axis."""
  p = jax.nn.sigmoid(logits)
  return 1 - (2 * jnp.sum(p * targets, -1) + 1) / (jnp.sum(p, -1) + jnp.sum(targets, -1) + 1)


def layered(segments):
  """segments as [B, H, W, L]: a map without a layer axis is one layer."""
  return segments[..., None] if segments.ndim == 3 else segments


def slot_mask(segments, slot):
  """bool [B, H, W]: the pixels of target `slot` (any layer)."""
  return jnp.any(layered(segments) == slot, axis=-1)


def target_masks(segments, num_slots, stride=1, dtype=jnp.float32):
  """[B, M, H/stride, W/stride]: slot m's binary mask, nearest-downsampled by striding."""
  seg = layered(segments)[:, ::stride, ::stride]
  return jnp.any(seg[:, None] == jnp.arange(num_slots)[None, :, None, None, None], axis=-1).astype(dtype)


def sample_targets(segments, coords, num_slots, first_slot=0):
  """Bilinear samples (align_corners=False, zero padding) of the binary target masks at `coords`.

  segments int32 [B, H, W] or [B, H, W, L]; coords [B, M, P, 2] in [0, 1] as (x, y) for the mask of
  slot `first_slot + m`. Equals `points.point_sample(target_masks(segments, M), coords)` (for
  first_slot 0) without building the dense masks.
  """
  segments = layered(segments)
  b, h, w, num_layers = segments.shape
  px = coords[..., 0] * w - 0.5
  py = coords[..., 1] * h - 0.5
  x0, y0 = jnp.floor(px), jnp.floor(py)
  flat = segments.reshape(b, 1, h * w, num_layers)
  slot = (first_slot + jnp.arange(num_slots))[None, :, None, None]
  out = 0.0
  for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
    xi, yi = x0 + dx, y0 + dy
    wgt = (1 - jnp.abs(px - xi)) * (1 - jnp.abs(py - yi))
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    idx = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32)
    seg = jnp.take_along_axis(flat, idx.reshape(b, 1, -1, 1), axis=2).reshape(*idx.shape, num_layers)
    out = out + jnp.where(inside & jnp.any(seg == slot, axis=-1), wgt, 0.0)
  return out


def _per_active_slot(fn, src, active):
  """Stacks fn(x [B, h, w], slot) -> (focal [B], dice [B]) over the M slots of `src` [B, M, h, w] into
  [B, M] each. A slot no image needs (`active` [B, M] all False) is skipped by a `lax.cond` and gets 0, so
  the cost follows the targets present rather than the M padded slots (the data packs targets first; at
  COCO's M=100 with ~20 targets an image most slots are padding, issue #12). Each slot is rematerialised
  so the backward pass keeps only its inputs, not M slots' residuals (the checkpoint goes around the
  cond: inside a branch it would stack `segments` once per slot)."""
  b, num_slots = src.shape[:2]
  if active is None:
    active = jnp.ones((b, num_slots), bool)

  def skip(x, slot):
    del slot
    zero = jnp.zeros(x.shape[:1], jnp.float32)
    return zero, zero

  def one_slot(args):
    x, slot, on = args
    return jax.lax.cond(on, fn, skip, x, slot)

  focal, dsc = jax.lax.map(jax.checkpoint(one_slot),
                           (jnp.swapaxes(src, 0, 1), jnp.arange(num_slots), jnp.any(active, axis=0)))
  return focal.T, dsc.T


def upsampled_mask_losses(src, segments, alpha, gamma, active=None, mask_loss="focal"):
  """Per-pair mask loss (`mask_loss` of MASK_LOSSES, mean over pixels) and dice, [B, M] each, of `src` [B, M, h, w] upsampled
  bilinearly (align_corners=False, as torch F.interpolate) to the full-res masks of `segments`.

  Slot by slot under rematerialisation, so at most one [B, H, W] logit map of a slot is alive: the
  original allocates [N, H, W] for all matched pairs at once, and M padded slots would be worse.
  Slots that no image uses (`active`) are skipped.
  """
  b = src.shape[0]
  height, width = segments.shape[1:3]
  pointwise = MASK_LOSSES[mask_loss]

  def run(x, slot):  # [B, h, w], the slot index
    x = jax.image.resize(x, (b, height, width), "bilinear", antialias=False).reshape(b, -1)
    t = slot_mask(segments, slot).reshape(b, -1).astype(jnp.float32)
    return jnp.mean(pointwise(x, t, alpha, gamma), axis=-1), dice(x, t)

  return _per_active_slot(run, src, active)


def point_mask_losses(src, segments, rng, loss_config, active=None):
  """Per-pair mask loss (`loss_config.mask_loss`, mean over points) and dice, [B, M] each, on the points
  Mask2Former samples for each slot's prediction, against bilinear samples of the binary target. Slots
  no image uses are skipped; each slot draws its own points, from `rng` folded with the slot index."""
  lc = loss_config
  pointwise = MASK_LOSSES[lc.mask_loss]

  def run(x, slot):  # [B, h, w], the slot index
    coords = sg(points_lib.sample_points_with_uncertainty(
        sg(x[:, None]), jax.random.fold_in(rng, slot), int(lc.num_points), float(lc.oversample_ratio),
        float(lc.importance_sample_ratio)))  # [B, 1, P, 2]
    logits = points_lib.point_sample(x[:, None], coords)[:, 0]  # [B, P]
    tgt = sample_targets(segments, coords, 1, first_slot=slot)[:, 0]
    return jnp.mean(pointwise(logits, tgt, lc.focal_alpha, lc.focal_gamma), axis=-1), dice(logits, tgt)

  return _per_active_slot(run, src, active)


def match(pred_logits, pred_masks, batch, loss_config, rng=None):
  """int32 [B, M]: the query matched to each target slot (no gradient); -1 for padding slots and for
  the targets left unmatched when an image has more than Q."""
  lc = loss_config
  segments, num_slots = batch["segments"], batch["labels"].shape[1]
  if lc.matcher_num_points > 0:  # Mask2Former: costs on points sampled from the full-res masks
    tgt = target_masks(segments, num_slots, dtype=bool)  # bool: 1 byte a pixel
  else:  # original: nearest-downsample the targets to the prediction size
    tgt = target_masks(segments, num_slots, segments.shape[1] // pred_masks.shape[2])
  cost = matcher_lib.matching_costs(
      sg(pred_logits), sg(pred_masks), batch["labels"], tgt, batch["valid"],
      cost_class=lc.cost_class, cost_mask=lc.cost_mask, cost_dice=lc.cost_dice,
      alpha=lc.focal_alpha, gamma=lc.focal_gamma, num_points=int(lc.matcher_num_points), rng=rng,
      mask_loss=lc.mask_loss)
  return sg(matcher_lib.make_matcher(lc.matcher)(sg(cost), batch["valid"]))


def layer_losses(pred_logits, pred_masks, batch, indices, loss_config, *, num_masks, ce_norm,
                 rng=None):
  """Unweighted {'loss_ce', 'loss_mask', 'loss_dice'} of one layer for a given matching `indices`."""
  lc = loss_config
  b, q, k1 = pred_logits.shape
  labels, segments = batch["labels"], batch["segments"]
  matched = indices >= 0

  # Cross-entropy over all queries; unmatched ones are no-object (index K), weighted eos_coef. An index
  # of -1 (padding or unmatched target) must not reach a gather or scatter, where JAX would wrap it
  # to query Q-1: it becomes the out-of-range Q, dropped.
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], indices.shape)
  target_cls = jnp.full((b, q), k1 - 1, jnp.int32).at[rows, jnp.where(matched, indices, q)].set(
      labels.astype(jnp.int32), mode="drop")
  logp = jax.nn.log_softmax(pred_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, target_cls[..., None], axis=-1)[..., 0]
  w = jnp.where(target_cls == k1 - 1, lc.eos_coef, 1.0)
  loss_ce = jnp.sum(w * nll) / ce_norm

  # Mask losses on matched pairs only: preds gathered by the match, [B, M, h, w] (slot -1 reads query
  # 0, then gets weight 0 below).
  src = jnp.take_along_axis(pred_masks.astype(jnp.float32),
                            jnp.maximum(indices, 0)[:, :, None, None], axis=1)
  if lc.point_sampling:  # Mask2Former: uncertainty-based importance-sampled points
    focal, dsc = point_mask_losses(src, segments, rng, lc, matched)
  else:  # original: bilinear (align_corners=False) upsampling to the padded full-res target
    focal, dsc = upsampled_mask_losses(src, segments, lc.focal_alpha, lc.focal_gamma, matched, lc.mask_loss)
  m = matched.astype(jnp.float32)
  loss_mask = jnp.sum(focal * m) / num_masks
  loss_dice = jnp.sum(dsc * m) / num_masks
  return {"loss_ce": loss_ce, "loss_mask": loss_mask, "loss_dice": loss_dice}


def set_criterion(outputs, batch, loss_config, *, num_masks, rng, ce_norm=None):
  """(total loss, terms) over the main layer and, with deep supervision, every auxiliary layer.

  batch: segments int32 [B, H, W] or [B, H, W, L], labels int32 [B, M], valid bool [B, M]. `num_masks`: global count
  of targets (>= 1); `ce_norm`: the CE's sum of weights over the global batch (default: this batch's,
  `class_weight_sum`); pass both for the full batch when `batch` is a micro-batch.
  Terms: loss_ce/loss_mask/loss_dice (main layer), loss_ce_i/... (aux layer i), their per-kind sums
  over layers (loss_ce_all, ...), and 'loss'.
  """
  lc = loss_config
  layers = [outputs] + (list(outputs.get("aux_outputs", ())) if lc.deep_supervision else [])
  if ce_norm is None:
    ce_norm = class_weight_sum(batch, outputs["pred_logits"].shape[1], lc.eos_coef)
  rng = jax.random.key(0) if rng is None else rng
  weights = {"loss_ce": lc.class_weight, "loss_mask": lc.mask_weight, "loss_dice": lc.dice_weight}
  terms, total = {}, 0.0
  for i, out in enumerate(layers):
    match_rng, point_rng = jax.random.split(jax.random.fold_in(rng, i))
    indices = match(out["pred_logits"], out["pred_masks"], batch, lc, match_rng)
    losses = layer_losses(out["pred_logits"], out["pred_masks"], batch, indices, lc,
                          num_masks=num_masks, ce_norm=ce_norm, rng=point_rng)
    suffix = "" if i == 0 else f"_{i - 1}"
    for name, value in losses.items():
      terms[name + suffix] = value
      terms[name + "_all"] = terms.get(name + "_all", 0.0) + value
      total = total + weights[name] * value
  terms["loss"] = total
  return total, terms
