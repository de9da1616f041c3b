"""Pictures of predictions: coloured panoptic and semantic maps, overlays, side-by-side summaries.

Used by the evaluators (TensorBoard image summaries) and by predict (an overlay per image); nothing here
affects a metric.
"""
import numpy as np
from PIL import Image

# Colours of the synthetic classes and otherwise a fixed palette, by contiguous class.
PALETTE = np.array([
    (220, 20, 60), (255, 200, 0), (140, 60, 220), (100, 170, 240), (120, 90, 50), (0, 160, 90),
    (255, 120, 0), (0, 80, 200), (230, 110, 180), (90, 200, 200), (170, 170, 30), (120, 120, 120),
], np.uint8)


def category_color(category) -> tuple[int, int, int]:
  """A category's colour: its own `color` (COCO's panoptic category lists carry one), else the palette's
  by contiguous class. Model cards record it, so a served model draws what training's summaries drew."""
  if category.get("color") is not None:
    return tuple(int(v) for v in category["color"])
  return tuple(int(v) for v in PALETTE[category["contiguous_id"] % len(PALETTE)])


def colorize(id_map, segments_info, categories):
  """Panoptic id map -> RGB: the class colour, things lightened/darkened per instance; void black."""
  colors = {c["id"]: category_color(c) for c in categories}
  out = np.zeros(id_map.shape + (3,), np.uint8)
  for i, s in enumerate(segments_info):
    base = np.array(colors[s["category_id"]], np.float32)
    if s.get("isthing", True) and any(c["id"] == s["category_id"] and c["isthing"] for c in categories):
      base = np.clip(base * (0.6 + 0.8 * ((i * 0.37) % 1.0)), 0, 255)
    out[id_map == s["id"]] = base.astype(np.uint8)
  return out


def colorize_semantic(labels, ignore=255):
  """Semantic label map (contiguous classes) -> RGB; ignore_label black."""
  out = PALETTE[np.asarray(labels) % len(PALETTE)]
  out[np.asarray(labels) == ignore] = 0
  return out


def overlay(image, id_map, segments_info, categories, alpha=0.5):
  """The image blended with the coloured segments, segment outlines in white."""
  colours = colorize(id_map, segments_info, categories)
  out = image.astype(np.float32)
  seg = id_map > 0
  out[seg] = (1 - alpha) * out[seg] + alpha * colours[seg]
  edge = np.zeros_like(seg)
  edge[1:] |= id_map[1:] != id_map[:-1]
  edge[:, 1:] |= id_map[:, 1:] != id_map[:, :-1]
  out[edge] = 255
  return out.astype(np.uint8)


def original_image(batch, i):
  """The i-th input image of an eval batch cropped to its content and resized back to its original size."""
  h, w = (int(v) for v in batch["image_size"][i])
  h0, w0 = (int(v) for v in batch["orig_size"][i])
  image = np.asarray(batch["image"][i][:h, :w])
  if (h, w) != (h0, w0):
    image = np.asarray(Image.fromarray(image).resize((w0, h0), Image.BILINEAR))
  return image


def side_by_side(*images):
  """RGB images of any heights in one row, 4 black pixels apart."""
  h = max(i.shape[0] for i in images)
  pad = [np.pad(i, ((0, h - i.shape[0]), (0, 4), (0, 0))) for i in images]
  return np.concatenate(pad, axis=1)


def stack(images):
  """Images of different sizes as one uint8 [N, H, W, 3] array (zero-padded bottom/right), or None."""
  if not images:
    return None
  h = max(s.shape[0] for s in images)
  w = max(s.shape[1] for s in images)
  return np.stack([np.pad(s, ((0, h - s.shape[0]), (0, w - s.shape[1]), (0, 0))) for s in images])
