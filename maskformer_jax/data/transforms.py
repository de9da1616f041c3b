"""Training recipes and the eval resize, all ending in static shapes with a padding mask.

Every recipe draws its geometry first (flip, one crop box in the original image, one output size) and
then touches pixels once: crop the original, one `cv2.resize` (bilinear for the image, nearest for the
segment map), flip, compact the segments present into slots (on the content only), paste into a zero
canvas of the static size (segments -1 there: the padding mask is also given by `image_size`). A
segment map may carry a trailing layer axis [h, w, L] (instance targets, which overlap): every layer
goes through the same geometry. A resize followed by a crop followed by a
resize (the DETR recipe) is thus one resize of a crop of the original, same geometry, a third the work.

Sizes follow detectron2's MaskFormer/Mask2Former mappers (docs/reference.md section 3) for the original
canvas (COCO DETR 1344, LSJ 1024, ADE20K 512); on a smaller canvas (tests, demo) the DETR and ADE20K
sizes scale with it so an example always fits.
"""
import functools

import cv2
import numpy as np

from maskformer_jax import registry


def shortest_edge_size(h, w, short, max_size):
  """detectron2 ResizeShortestEdge.get_output_shape: shortest edge to `short`, longest <= max_size."""
  scale = short / min(h, w)
  nh, nw = h * scale, w * scale
  if max(nh, nw) > max_size:
    s = max_size / max(nh, nw)
    nh, nw = nh * s, nw * s
  return int(nh + 0.5), int(nw + 0.5)


def _fit(size, canvas):
  """Shrink (h, w) keeping the aspect ratio until it fits the canvas (a guard, rarely active)."""
  h, w = size
  s = min(1.0, canvas[0] / h, canvas[1] / w)
  return (max(1, min(canvas[0], int(h * s + 0.5))), max(1, min(canvas[1], int(w * s + 0.5)))) \
      if s < 1.0 else (h, w)


def crop_resize(image, segments, box, out_hw, flip):
  """Crop `box` (y0, x0, y1, x1) of the original, resize to out_hw (bilinear / nearest), flip."""
  y0, x0, y1, x1 = box
  img, seg = image[y0:y1, x0:x1], segments[y0:y1, x0:x1]
  oh, ow = out_hw
  if (oh, ow) != img.shape[:2]:
    img = cv2.resize(img, (ow, oh), interpolation=cv2.INTER_LINEAR)
    # Each layer of an [h, w, L] map alike (OpenCV drops a single channel axis: put it back).
    seg = cv2.resize(seg, (ow, oh), interpolation=cv2.INTER_NEAREST_EXACT).reshape(oh, ow, *seg.shape[2:])
  if flip:
    img, seg = img[:, ::-1], seg[:, ::-1]
  return img, seg


def pad(img, seg, canvas):
  """Paste top-left into a zero image / -1 segment canvas of the static size."""
  out_img = np.zeros((*canvas, 3), np.uint8)
  out_seg = np.full((*canvas, *seg.shape[2:]), -1, np.int32)
  out_img[:img.shape[0], :img.shape[1]] = img
  out_seg[:seg.shape[0], :seg.shape[1]] = seg
  return out_img, out_seg


def _crop_box(rng, size, crop):
  """Uniform random crop of `crop` (clipped to the image) inside an image of `size`: (y0, x0, ch, cw)."""
  ch, cw = min(crop[0], size[0]), min(crop[1], size[1])
  return int(rng.integers(0, size[0] - ch + 1)), int(rng.integers(0, size[1] - cw + 1)), ch, cw


def _to_original(y0, x0, ch, cw, scale, shape):
  """A box in an image resized by `scale` -> integer box in the original (clipped, non-empty)."""
  h, w = shape
  oy0, ox0 = min(int(y0 / scale + 0.5), h - 1), min(int(x0 / scale + 0.5), w - 1)
  oy1, ox1 = min(max(int((y0 + ch) / scale + 0.5), oy0 + 1), h), min(max(int((x0 + cw) / scale + 0.5),
                                                                         ox0 + 1), w)
  return oy0, ox0, oy1, ox1


def coco_detr_geometry(rng, shape, canvas, max_size=1333):
  """DETR-style: flip; p=0.5 [shortest edge 400/500/600, crop 384..600]; shortest edge 480..800 step 32,
  longest <= max_size (1333; the original's Swin-L uses 1000). Sizes scale by min(1, min(canvas)/C),
  C = max_size rounded up to a multiple of 32 (the recipe's own canvas: 1344, or 1024)."""
  h, w = shape
  s = min(1.0, min(canvas) / (-(-max_size // 32) * 32))
  flip = bool(rng.random() < 0.5)
  box, cur = (0, 0, h, w), (h, w)
  if rng.random() < 0.5:
    short = round(rng.choice([400, 500, 600]) * s)
    rh, rw = shortest_edge_size(h, w, short, float("inf"))
    lo, hi = round(384 * s), round(600 * s)
    ch = int(rng.integers(min(rh, lo), min(rh, hi) + 1))  # RandomCrop "absolute_range"
    cw = int(rng.integers(min(rw, lo), min(rw, hi) + 1))
    y0, x0, ch, cw = _crop_box(rng, (rh, rw), (ch, cw))
    box, cur = _to_original(y0, x0, ch, cw, rh / h, shape), (ch, cw)
  short = round(rng.choice(np.arange(480, 801, 32)) * s)
  out = _fit(shortest_edge_size(*cur, short, max_size * s), canvas)
  return box, out, flip


def lsj_geometry(rng, shape, canvas):
  """Large-scale jitter (Mask2Former): flip; scale U(0.1, 2.0) of the canvas; fixed-size crop."""
  h, w = shape
  flip = bool(rng.random() < 0.5)
  r = rng.uniform(0.1, 2.0)
  scale = min(r * canvas[0] / h, r * canvas[1] / w)  # ResizeScale
  rh, rw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
  ch, cw = min(canvas[0], rh), min(canvas[1], rw)  # FixedSizeCrop: one uniform draw scales the
  u = rng.random()                                  # overflow of both axes (as detectron2 does)
  y0, x0 = int(round(u * (rh - ch))), int(round(u * (rw - cw)))
  return _to_original(y0, x0, ch, cw, rh / h, shape), (ch, cw), flip


def ade20k_geometry(rng, shape, canvas):
  """Shortest edge one of int(x*0.1*c), x in 5..20, max 4c; random crop c (area constraint 1.0 = plain
  crop); flip. c = min(canvas) (512 originally)."""
  h, w = shape
  c = min(canvas)
  flip = bool(rng.random() < 0.5)
  short = int(rng.choice([int(x * 0.1 * c) for x in range(5, 21)]))
  rh, rw = shortest_edge_size(h, w, short, 4 * c)
  y0, x0, ch, cw = _crop_box(rng, (rh, rw), canvas)
  return _to_original(y0, x0, ch, cw, rh / h, shape), (ch, cw), flip


# config.data.recipe -> (geometry(rng, (h, w), canvas) -> (crop box, output size, flip), colour jitter?).
# The ADE20K recipe adds the SSD photometric distortion (detectron2's ColorAugSSDTransform).
RECIPES = {
    "coco_detr": (coco_detr_geometry, False),
    "coco_detr_max1000": (functools.partial(coco_detr_geometry, max_size=1000), False),  # Swin-L COCO
    "lsj": (lsj_geometry, False),
    "ade20k": (ade20k_geometry, True),
}


def _lut(alpha, beta):
  return np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def color_aug_ssd(image, rng):
  """detectron2's ColorAugSSDTransform (brightness, contrast, saturation, hue; each p=0.5) on uint8
  RGB, with lookup tables instead of float images."""
  if rng.random() < 0.5:
    image = cv2.LUT(image, _lut(1.0, rng.uniform(-32, 32)))
  contrast_first = rng.integers(2) == 1
  if contrast_first and rng.random() < 0.5:
    image = cv2.LUT(image, _lut(rng.uniform(0.5, 1.5), 0))
  if rng.random() < 0.5:  # saturation
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = cv2.LUT(hsv[..., 1], _lut(rng.uniform(0.5, 1.5), 0))
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if rng.random() < 0.5:  # hue (OpenCV hue is 0..179)
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + rng.integers(-18, 18)) % 180).astype(np.uint8)
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if not contrast_first and rng.random() < 0.5:
    image = cv2.LUT(image, _lut(rng.uniform(0.5, 1.5), 0))
  return image


def finalize(segments, seg_labels, max_instances, num_classes):
  """Compact the segments present after the transform into M slots.

  Segments absent from the crop are dropped; if more than M remain, the M largest (by pixel count in
  the crop, over all layers of an [H, W, L] map) are kept and the rest become -1. Returns (segments int32
  [H, W] (or [H, W, L]) in -1..M-1, labels int32 [M]
  (num_classes for unused slots), valid bool [M], overflow count).
  """
  n = len(seg_labels)
  shifted = segments.ravel() + 1
  counts = np.bincount(shifted, minlength=n + 1)[1:]
  present = np.flatnonzero(counts)
  overflow = max(0, len(present) - max_instances)
  if overflow:  # the largest M, ties to the lower index; keep dataset order among them
    present = np.sort(present[np.argsort(-counts[present], kind="stable")[:max_instances]])
  labels = np.full(max_instances, num_classes, np.int32)
  labels[:len(present)] = np.asarray(seg_labels, np.int32)[present]
  valid = np.zeros(max_instances, bool)
  valid[:len(present)] = True
  if len(present) == n:  # every segment kept, in order: the map is already compact
    return np.ascontiguousarray(segments, np.int32), labels, valid, overflow
  lut = np.full(n + 1, -1, np.int32)
  lut[present + 1] = np.arange(len(present), dtype=np.int32)
  return lut[shifted].reshape(segments.shape), labels, valid, overflow


def _example(img, seg, ex, canvas, max_instances, num_classes):
  """Content-sized image and segments -> the static example (slots compacted before padding)."""
  out_hw = img.shape[:2]
  seg, labels, valid, overflow = finalize(seg, ex["seg_labels"], max_instances, num_classes)
  img, seg = pad(img, seg, canvas)
  out = {"image": img, "segments": seg, "labels": labels, "valid": valid,
         "image_size": np.array(out_hw, np.int32),
         "orig_size": np.array(ex["image"].shape[:2], np.int32),
         "image_id": np.int32(ex["image_id"])}
  return out, overflow


def train_example(ex, rng, *, recipe, canvas, max_instances, num_classes):
  """Decoded example (source format) -> (batch-contract example at the static canvas, overflow)."""
  geometry, colour_jitter = registry.get(RECIPES, recipe, "data.recipe")
  canvas = tuple(int(c) for c in canvas)
  box, out_hw, flip = geometry(rng, ex["image"].shape[:2], canvas)
  img, seg = crop_resize(ex["image"], ex["segments"], box, out_hw, flip)
  if colour_jitter:
    img = color_aug_ssd(np.ascontiguousarray(img), rng)
  return _example(img, seg, ex, canvas, max_instances, num_classes)


def eval_example(ex, *, canvas, min_size, max_size, max_instances, num_classes):
  """The test resize: shortest edge min_size, longest <= max_size, padded to the static canvas."""
  canvas = tuple(int(c) for c in canvas)
  h, w = ex["image"].shape[:2]
  out_hw = _fit(shortest_edge_size(h, w, min_size, max_size), canvas)
  img, seg = crop_resize(ex["image"], ex["segments"], (0, 0, h, w), out_hw, False)
  return _example(img, seg, ex, canvas, max_instances, num_classes)


def padding_example(canvas, max_instances, num_classes, layers=0):
  """A batch-filler: image_id -1, no valid target, all pixels ignored; sizes = the canvas (never 0).
  `layers` > 0: segments [H, W, layers], as the instance source's examples."""
  canvas = tuple(int(c) for c in canvas)
  seg_shape = (*canvas, layers) if layers else canvas
  return {"image": np.zeros((*canvas, 3), np.uint8), "segments": np.full(seg_shape, -1, np.int32),
          "labels": np.full(max_instances, num_classes, np.int32),
          "valid": np.zeros(max_instances, bool), "image_size": np.array(canvas, np.int32),
          "orig_size": np.array(canvas, np.int32), "image_id": np.int32(-1)}
