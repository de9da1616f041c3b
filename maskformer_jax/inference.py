"""Turning model outputs into panoptic / semantic / instance results (docs/reference.md section 4), batched in JAX.

Everything here has static shapes so it jits once per input shape: dropped queries are masked rather than
removed, and segment ids follow a static scheme. A segment's id is 1 + the index of the query that
represents it: a thing query represents itself; the stuff queries of one class are merged into the segment
of the FIRST surviving stuff query of that class (the original assigns its merged stuff segment the id of
the first query of the class too, only numbered consecutively). `segment_class[b, q]` is the contiguous
class of segment id q + 1 (-1: no such segment); `to_coco_panoptic` renumbers ids consecutively on the host.

Original resolution (`postprocess_to_original`): the original upsamples the stride-4 mask logits to the
padded input, crops the image content, resizes that crop bilinearly to the original image size and only
then runs the panoptic inference. The crop size and the original size vary per image, which would mean a
compilation per size (or a host loop); instead both bilinear steps are written as torch's explicit
2-tap source indices and weights (`bilinear_taps`), computed from the per-image (traced) sizes, onto a
static canvas at least as large as the original. Composed, the two steps are 3 gathered taps per axis
applied to the stride-4 map (`composed_taps`), so the [Q, H, W] padded-size map is never built. Pixels
outside the original extent are masked out of every area and cut away on the host. That is exact at the
original resolution and compiles once per canvas bucket (multiples of 64). Panoptic inference only ever
uses the queries that pass the class-score test (about 30 of 100 for a trained COCO model), so it resizes
only those, one mask at a time inside a loop whose trip count is the image's number of kept queries:
shapes stay static, one compilation serves every count, and the full-resolution work is the kept fraction
of all queries (HF's post-processing likewise resizes only the kept masks). `panoptic_inference(...,
out_size=...)` without a crop stays for cheap previews at a static size.
"""
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def bilinear_taps(in_size, out_len: int, out_size=None):
  """Source indices and weights [out_len, 2] of torch's bilinear resize (align_corners=False) of an axis
  of in_size to out_size (default out_len) samples; sizes may be traced, out_len is static.

  As torch: src = (dst + 0.5) * in / out - 0.5 clamped at 0, neighbours floor(src) and the next one
  clamped to the last row. Outputs past out_size (canvas padding) get in-range garbage."""
  in_size = jnp.asarray(in_size, jnp.int32)
  out_size = jnp.asarray(out_len if out_size is None else out_size, jnp.int32)
  scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
  src = jnp.maximum((jnp.arange(out_len, dtype=jnp.float32) + 0.5) * scale - 0.5, 0.0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  lam = src - i0.astype(jnp.float32)
  return jnp.stack([i0, i1], -1), jnp.stack([1.0 - lam, lam], -1)


def _apply_taps(x, axis, idx, w):
  """y[..., i, ...] = sum_t w[i, t] * x[..., idx[i, t], ...] along `axis`, no dense matrices.

  One gather per tap, added in tap order: XLA fuses that into one pass, where gathering all taps and
  reducing over a tap axis ran 10-50x slower on CPU. Indices are in range by construction (clip)."""
  shape = [1] * x.ndim
  shape[axis] = idx.shape[0]
  y = None
  for t in range(idx.shape[1]):
    term = jnp.take(x, idx[:, t], axis=axis, mode="clip") * w[:, t].reshape(shape).astype(x.dtype)
    y = term if y is None else y + term
  return y


def resize_bilinear(x, out_size):
  """Bilinear resize of the last two axes like torch `F.interpolate(align_corners=False)` (no antialias)."""
  out_size = tuple(int(s) for s in out_size)
  if tuple(x.shape[-2:]) == out_size:
    return x
  x = _apply_taps(x, x.ndim - 2, *bilinear_taps(x.shape[-2], out_size[0]))
  return _apply_taps(x, x.ndim - 1, *bilinear_taps(x.shape[-1], out_size[1]))


def crop_resize(x, content_size, orig_size, canvas):
  """One image's [C, H, W] padded map -> its content crop resized bilinearly to orig_size, on a canvas.

  Returns ([C, canvas_h, canvas_w], valid bool [canvas_h, canvas_w]); values are meaningful where valid.
  content_size and orig_size are int (h, w) arrays and may be traced.
  """
  ri, rw = bilinear_taps(content_size[0], canvas[0], orig_size[0])
  ci, cw = bilinear_taps(content_size[1], canvas[1], orig_size[1])
  y = _apply_taps(_apply_taps(x, 1, ri, rw), 2, ci, cw)
  return y, _valid(orig_size, canvas)


def _valid(orig_size, canvas):
  return (jnp.arange(canvas[0])[:, None] < orig_size[0]) & (jnp.arange(canvas[1])[None, :] < orig_size[1])


def composed_taps(in_size, padded_size, content_size, orig_size, canvas):
  """Row and column taps (idx, w) [canvas_h or canvas_w, k] of the two bilinear steps composed: an axis
  of in_size upsampled to padded_size, cropped to content_size, resized to orig_size (on the canvas).

  k = 4 (2 x 2 taps); when the first step upsamples (padded >= in, static: the stride-4 masks) those read
  at most 3 consecutive sources and k = 3, the weights of a repeated source summed: a quarter less work
  for the same interpolation (it moves some results by an ulp, as any reordering of the sum would)."""
  out = []
  for a in range(2):
    i1, w1 = bilinear_taps(in_size[a], padded_size[a])
    i2, w2 = bilinear_taps(content_size[a], canvas[a], orig_size[a])
    idx, w = i1[i2].reshape(canvas[a], 4), (w2[:, :, None] * w1[i2]).reshape(canvas[a], 4)
    out += _merge_taps(idx, w) if padded_size[a] >= in_size[a] else (idx, w)
  return tuple(out)


def _merge_taps(idx, w):
  """Taps (s, s', t, t') of two neighbouring upsampled pixels (s' = s + 1 and t' = t + 1, both clamped at
  the last source) where upsampling makes t either s or s' -> 3 taps (s, s', t'); when t == s the third
  weight is 0 on a source already read, so a NaN or inf spreads exactly as with 4 taps."""
  same = idx[:, 2] == idx[:, 0]
  w = jnp.stack([jnp.where(same, w[:, 0] + w[:, 2], w[:, 0]),
                 jnp.where(same, w[:, 1] + w[:, 3], w[:, 1] + w[:, 2]),
                 jnp.where(same, 0.0, w[:, 3])], axis=1)
  return [jnp.stack([idx[:, 0], idx[:, 1], jnp.where(same, idx[:, 1], idx[:, 3])], axis=1), w]


def upsample_crop_resize(x, padded_size, content_size, orig_size, canvas, nonlinearity=None):
  """The original's `F.interpolate(x, padded)[..., :h, :w]` -> `F.interpolate(., orig)`, for [C, h, w].

  Without a nonlinearity the two bilinear steps compose into 3-4 taps per axis, applied to the small map
  directly; with one (applied between the steps, e.g. sigmoid + class mixing for semantic inference) only
  the padded pixels the second step reads are computed. Either way no [C, H, W] map is materialised."""
  if nonlinearity is None:
    ri, rw, ci, cw = composed_taps(x.shape[1:], padded_size, content_size, orig_size, canvas)
    return _apply_taps(_apply_taps(x, 1, ri, rw), 2, ci, cw), _valid(orig_size, canvas)
  r1, rw1 = bilinear_taps(x.shape[1], padded_size[0])
  c1, cw1 = bilinear_taps(x.shape[2], padded_size[1])
  r2, rw2 = bilinear_taps(content_size[0], canvas[0], orig_size[0])
  c2, cw2 = bilinear_taps(content_size[1], canvas[1], orig_size[1])
  rows = r2.reshape(-1)
  cols = c2.reshape(-1)
  y = _apply_taps(_apply_taps(x, 1, r1[rows], rw1[rows]), 2, c1[cols], cw1[cols])  # padded pixels read
  y = nonlinearity(y)
  y = y.reshape(y.shape[0], canvas[0], 2, canvas[1], 2)
  y = jnp.einsum("cptqs,pt,qs->cpq", y, rw2.astype(y.dtype), cw2.astype(y.dtype))
  return y, _valid(orig_size, canvas)


def _panoptic_single(logits, plane, valid, is_thing, object_mask_threshold, overlap_threshold, hf_compat):
  """Original MaskFormer `panoptic_inference` for one image.

  plane(q) gives query q's mask logits [H, W] at the output resolution (any 2-D layout, shared with valid
  and the returned map). It is called only for the kept queries, one at a time in query order: the rest
  cannot win a pixel or make a segment, so the full-resolution work is the kept fraction of the queries,
  with static shapes (the loop's trip count is the number kept) and no [Q, H, W] map."""
  num_queries, num_classes = logits.shape[0], logits.shape[-1] - 1
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  score, label = probs.max(-1), probs.argmax(-1)
  keep = (label != num_classes) & (score > object_mask_threshold)
  kept = jnp.nonzero(keep, size=num_queries)[0]  # kept queries first, in query order

  def add_query(i, carry):
    best, ids, orig_area = carry
    q = kept[i]
    mask_probs = jax.nn.sigmoid(plane(q).astype(jnp.float32))
    weighted = score[q] * mask_probs
    # HF thresholds the score-weighted probability for the "original area"; the original the plain one.
    area = (((weighted if hf_compat else mask_probs) >= 0.5) & valid).sum()
    # Running jnp.argmax over the kept queries: the first maximum wins, and so does the first NaN.
    better = (weighted > best) | (jnp.isnan(weighted) & ~jnp.isnan(best))
    return jnp.where(better, weighted, best), jnp.where(better, q, ids), orig_area.at[q].set(area)

  init = (jnp.full(valid.shape, -jnp.inf, jnp.float32), jnp.zeros(valid.shape, jnp.int32),
          jnp.zeros(num_queries, jnp.int32))
  _, ids, orig_area = jax.lax.fori_loop(0, keep.sum(), add_query, init)  # [H, W]: 0 if none is kept
  qs = jnp.arange(num_queries)
  mask_area = jnp.bincount(ids.reshape(-1), weights=valid.reshape(-1).astype(jnp.int32), length=num_queries)
  ratio = mask_area / jnp.maximum(orig_area, 1)
  # Original: drop if ratio < threshold; HF: keep only if ratio > threshold (differs at equality only).
  big_enough = ratio > overlap_threshold if hf_compat else ratio >= overlap_threshold
  seg_valid = keep & (mask_area > 0) & (orig_area > 0) & big_enough
  thing = jnp.asarray(is_thing)[jnp.clip(label, 0, num_classes - 1)]
  same_stuff = (label[:, None] == label[None, :]) & (seg_valid & ~thing)[None, :]
  rep = jnp.where(thing, qs, jnp.argmax(same_stuff, axis=1))  # first surviving stuff query of the class
  query_segment = jnp.where(seg_valid, rep + 1, 0).astype(jnp.int32)
  panoptic = jnp.where(valid, query_segment[ids], 0)
  is_rep = seg_valid & (rep == qs)
  return dict(panoptic=panoptic.astype(jnp.int32),
              segment_class=jnp.where(is_rep, label, -1).astype(jnp.int32),
              segment_score=jnp.where(is_rep, score, 0.0), isthing=is_rep & thing,
              query_segment=query_segment)


@functools.partial(jax.jit, static_argnames=("out_size", "hf_compat"))
def panoptic_inference(pred_logits, pred_masks, *, is_thing, object_mask_threshold, overlap_threshold,
                       out_size: Optional[Sequence[int]] = None, valid=None, hf_compat: bool = False):
  """Batched panoptic inference: pred_logits [B, Q, K+1], pred_masks [B, Q, h, w] logits.

  Masks are upsampled (bilinear, align_corners=False) to out_size first. `valid` (bool [B, H, W], optional)
  restricts every area to the image (used for the canvas at the original resolution). `hf_compat`
  reproduces Hugging Face's area test (score-weighted "original area", strict ratio comparison); off, it
  is the original MaskFormer's. Returns panoptic int32 [B, H, W] (0 = void, id q+1 as in the module doc),
  segment_class int32 [B, Q], segment_score f32 [B, Q], isthing bool [B, Q], query_segment int32 [B, Q]
  (segment id each query contributes to, 0 if dropped).
  """
  masks = pred_masks if out_size is None else resize_bilinear(pred_masks, out_size)
  if valid is None:
    valid = jnp.ones((masks.shape[0],) + masks.shape[-2:], bool)
  fn = functools.partial(_panoptic_single, is_thing=is_thing, object_mask_threshold=object_mask_threshold,
                         overlap_threshold=overlap_threshold, hf_compat=hf_compat)
  return jax.vmap(lambda l, m, v: fn(l, lambda q: m[q], v))(pred_logits, masks, valid)


def _semantic_single(logits, masks):
  cls = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :-1]
  return jnp.einsum("qc,qhw->chw", cls, jax.nn.sigmoid(masks.astype(jnp.float32)))


@functools.partial(jax.jit, static_argnames=("out_size",))
def semantic_inference(pred_logits, pred_masks, *, out_size: Optional[Sequence[int]] = None):
  """Per-class scores einsum('qc,qhw->chw', softmax[..., :K], sigmoid(mask)) [B, K, H, W] and their argmax."""
  masks = pred_masks if out_size is None else resize_bilinear(pred_masks, out_size)
  scores = jax.vmap(_semantic_single)(pred_logits, masks)
  return dict(sem_seg=scores, labels=jnp.argmax(scores, axis=1).astype(jnp.int32))


def _instance_single(logits, masks, valid, is_thing, topk):
  num_classes = logits.shape[-1] - 1
  scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, :-1].reshape(-1)
  top_scores, top_idx = jax.lax.top_k(scores, topk)
  labels, query = top_idx % num_classes, top_idx // num_classes
  m = masks[query].astype(jnp.float32)
  binary = (m > 0) & valid[None]
  mask_score = (jax.nn.sigmoid(m) * binary).sum((1, 2)) / (binary.sum((1, 2)) + 1e-6)
  keep = jnp.ones_like(labels, bool) if is_thing is None else jnp.asarray(is_thing)[labels]
  return dict(masks=binary, scores=top_scores * mask_score, labels=labels.astype(jnp.int32), valid=keep,
              query=query.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("out_size", "topk"))
def instance_inference(pred_logits, pred_masks, *, is_thing=None, topk: Optional[int] = None,
                       out_size: Optional[Sequence[int]] = None, valid=None):
  """Mask2Former instance inference: top-k (default Q) over the Q*K class scores, each with its query's
  binary mask (logit > 0) and score = class prob * mean mask prob inside the mask.

  `is_thing` given (panoptic datasets), `valid` marks the top-k entries of stuff classes False instead of
  removing them (static shapes). Returns masks bool [B, k, H, W], scores, labels, valid, query [B, k].
  """
  masks = pred_masks if out_size is None else resize_bilinear(pred_masks, out_size)
  if valid is None:
    valid = jnp.ones((masks.shape[0],) + masks.shape[-2:], bool)
  k = pred_logits.shape[1] if topk is None else topk
  return jax.vmap(lambda l, m, v: _instance_single(l, m, v, is_thing, k))(pred_logits, masks, valid)


# ----------------------------------------------------------------------------------- original resolution

def canvas_for(orig_sizes, multiple: int = 64):
  """Static canvas (h, w) covering every original size in the batch, rounded up to limit recompilation."""
  m = np.max(np.asarray(orig_sizes).reshape(-1, 2), axis=0)
  return tuple(int(-(-int(v) // multiple) * multiple) for v in m)


@functools.partial(jax.jit, static_argnames=("task", "padded_size", "canvas", "topk", "things_only"))
def _to_original(pred_logits, pred_masks, image_size, orig_size, is_thing, object_mask_threshold,
                 overlap_threshold, *, task, padded_size, canvas, topk=None, things_only=False):
  """Per image (lax.map, so only one image's full-resolution maps are alive at a time)."""
  def one(args):
    logits, masks, content, orig = args
    masks = masks.astype(jnp.float32)
    if task == "semantic":  # original: scores at the padded size, then crop + resize the scores
      cls = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, :-1]
      # Resizing is linear, so mixing the classes after the second resize gives the same scores.
      probs, valid = upsample_crop_resize(masks, padded_size, content, orig, canvas, jax.nn.sigmoid)
      scores = jnp.einsum("qc,qhw->chw", cls, probs)
      return dict(labels=jnp.argmax(scores, axis=0).astype(jnp.int32), valid=valid)
    if task == "panoptic":
      ri, rw, ci, cw = composed_taps(masks.shape[1:], padded_size, content, orig, canvas)
      # Rows, then columns with the map transposed: gathering whole rows rather than along the minor axis
      # made the whole panoptic step 1.7x faster on CPU. The merge is per pixel, so it runs transposed.
      plane = lambda q: _apply_taps(_apply_taps(masks[q], 0, ri, rw).T, 0, ci, cw)
      res = _panoptic_single(logits, plane, _valid(orig, canvas).T, is_thing, object_mask_threshold,
                             overlap_threshold, False)
      return dict(res, panoptic=res["panoptic"].T)
    resized, valid = upsample_crop_resize(masks, padded_size, content, orig, canvas)
    return _instance_single(logits, resized, valid, is_thing if things_only else None,
                            topk or logits.shape[0])
  return jax.lax.map(one, (pred_logits, pred_masks, image_size, orig_size))


def postprocess_to_original(outputs, batch, *, categories, task: str = "panoptic",
                            object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8,
                            padded_size: Optional[Sequence[int]] = None, topk: Optional[int] = None,
                            panoptic_things_only: bool = True):
  """Model outputs for an eval batch -> a list with one result per image at its original resolution.

  outputs: {'pred_logits' [B, Q, K+1], 'pred_masks' [B, Q, h, w]}, this host's examples (numpy or
  addressable arrays); batch: needs 'image_size', 'orig_size' and optionally 'image_id' (entries with
  id < 0 are batch padding and give None). Thresholds: config.eval.object_mask_threshold and
  overlap_threshold. categories: list of {id, isthing, contiguous_id} (dataset order). padded_size
  (the static eval input size, config.data.eval_size) defaults to 4 * the mask size.
  Per image: panoptic -> (id map int32 [h0, w0], segments_info) as `to_coco_panoptic`; semantic -> label
  map int32 [h0, w0] (contiguous classes); instance -> dict(masks bool [n, h0, w0], scores, category_id).
  """
  # may_alias: on CPU, numpy arrays as jax.device_get returns them are used in place instead of copied
  # (the copy of [B, Q, h, w] cost a quarter of the panoptic time); nothing here writes to them.
  logits, masks = (jax.device_put(outputs[k], may_alias=True) for k in ("pred_logits", "pred_masks"))
  if padded_size is None:
    padded_size = (4 * masks.shape[-2], 4 * masks.shape[-1])
  image_size, orig_size = np.asarray(batch["image_size"]), np.asarray(batch["orig_size"])
  ids = np.asarray(batch.get("image_id", np.zeros(len(orig_size), np.int32)))
  is_thing = is_thing_array(categories)
  things_only = bool(panoptic_things_only and task == "instance" and not is_thing.all())
  out = _to_original(logits, masks, jnp.asarray(image_size), jnp.asarray(orig_size), jnp.asarray(is_thing),
                     object_mask_threshold, overlap_threshold, task=task,
                     padded_size=tuple(int(s) for s in padded_size), canvas=canvas_for(orig_size), topk=topk,
                     things_only=things_only)
  out = jax.device_get(out)
  results = []
  for i, (h0, w0) in enumerate(orig_size):
    if ids[i] < 0:
      results.append(None)
      continue
    one = {k: v[i] for k, v in out.items()}
    if task == "panoptic":
      one["panoptic"] = one["panoptic"][:h0, :w0]
      results.append(to_coco_panoptic(one, categories))
    elif task == "semantic":
      results.append(one["labels"][:h0, :w0])
    else:
      sel = one["valid"]
      contiguous_to_id = np.zeros(len(categories), np.int64)
      for j, c in enumerate(categories):
        contiguous_to_id[c.get("contiguous_id", j)] = c["id"]
      results.append(dict(masks=one["masks"][sel, :h0, :w0], scores=one["scores"][sel],
                          category_id=contiguous_to_id[one["labels"][sel]]))
  return results


def is_thing_array(categories):
  """bool [K] indexed by contiguous id, from the dataset's category list."""
  out = np.zeros(len(categories), bool)
  for i, c in enumerate(categories):
    out[c.get("contiguous_id", i)] = bool(c.get("isthing", 0))
  return out


def to_coco_panoptic(result: dict, categories):
  """One image's panoptic result (numpy, panoptic cropped to the image) -> (id map, segments_info).

  Ids become 1..n in order of their representative query; segments with no pixel left are dropped (the
  COCO format requires every listed segment to appear in the PNG). segments_info carries the original
  category id, isthing, score and area.
  """
  pan = np.asarray(result["panoptic"])
  seg_class = np.asarray(result["segment_class"])
  score = np.asarray(result["segment_score"])
  by_contiguous = {c.get("contiguous_id", i): c for i, c in enumerate(categories)}
  area = np.bincount(pan.reshape(-1), minlength=len(seg_class) + 1)
  lut = np.zeros(len(seg_class) + 1, np.int32)
  segments_info = []
  for q in np.nonzero((seg_class >= 0) & (area[1:] > 0))[0]:
    lut[q + 1] = len(segments_info) + 1
    cat = by_contiguous[int(seg_class[q])]
    segments_info.append(dict(id=len(segments_info) + 1, category_id=int(cat["id"]),
                              isthing=bool(cat.get("isthing", 0)),
                              score=float(score[q]), area=int(area[q + 1])))
  return lut[pan], segments_info
