"""Recipes: static shapes, padding mask, masks aligned with the image, recipe sizes, slot compaction."""
import cv2
import numpy as np
import pytest
from hypothesis import given, strategies as st

from maskformer_jax.data import transforms

PALETTE = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10], [10, 250, 250],
                    [250, 10, 250], [128, 128, 128]], np.uint8)


def blocky_example(h, w, seed=0):
  """Segments are big rectangles; the image is exactly the palette colour of each pixel's segment."""
  rng = np.random.default_rng(seed)
  seg = np.full((h, w), 6, np.int32)
  for k in range(6):
    y, x = rng.integers(0, h * 3 // 4), rng.integers(0, w * 3 // 4)
    seg[y:y + h // 3, x:x + w // 3] = k
  seg[:h // 10] = -1  # void band
  image = np.where(seg[..., None] >= 0, PALETTE[seg], 0).astype(np.uint8)
  return {"image": image, "segments": seg, "seg_labels": np.arange(7, dtype=np.int32), "image_id": 5}


def _interior(seg, r):
  """Pixels whose (2r+1)^2 neighbourhood lies in one segment: bilinear resampling keeps their colour
  there (an upscale by f blends colours up to about f pixels from a boundary)."""
  k = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
  out = np.zeros(seg.shape, bool)
  for s in np.unique(seg):
    out |= cv2.erode((seg == s).astype(np.uint8), k, borderValue=0).astype(bool)
  return out


def check_contract(out, canvas, m, k):
  assert out["image"].shape == (*canvas, 3) and out["image"].dtype == np.uint8
  assert out["segments"].shape == canvas and out["segments"].dtype == np.int32
  assert out["labels"].shape == (m,) and out["valid"].shape == (m,)
  h, w = out["image_size"]
  assert 0 < h <= canvas[0] and 0 < w <= canvas[1]
  pad = np.ones(canvas, bool)
  pad[:h, :w] = False
  assert (out["segments"][pad] == -1).all() and (out["image"][pad] == 0).all()
  assert out["segments"].max() < m and out["segments"].min() >= -1
  n = out["valid"].sum()
  assert out["valid"][:n].all() and (out["labels"][n:] == k).all()
  for s in range(n):  # every valid slot has pixels
    assert (out["segments"] == s).any()


@pytest.mark.parametrize("recipe,canvas", [("coco_detr", (96, 96)), ("coco_detr", (1344, 1344)),
                                           ("lsj", (64, 80)), ("ade20k", (64, 64))])
def test_recipes_keep_masks_and_image_aligned(recipe, canvas):
  ex = blocky_example(120, 160)
  for seed in range(6 if canvas[0] < 1000 else 2):
    out, _ = transforms.train_example(ex, np.random.default_rng(seed), recipe=recipe, canvas=canvas,
                                      max_instances=8, num_classes=7)
    check_contract(out, canvas, 8, 7)
    seg, img = out["segments"], out["image"].astype(int)
    r = int(np.ceil(max(out["image_size"]) / (0.5 * 120))) + 1  # crops keep >= half the image
    inner = _interior(seg, r) & (seg >= 0)
    assert inner.sum() > 50
    for s in np.flatnonzero(out["valid"]):
      px = img[inner & (seg == s)]
      if not len(px):
        continue
      if recipe == "ade20k":  # colour jitter is per-pixel-identical: a segment stays one colour
        assert np.ptp(px, axis=0).max() <= 2
      else:  # the exact colour of that segment's class: no shift, no flip mismatch
        assert np.abs(px - PALETTE[out["labels"][s]]).max() <= 1


def test_recipes_flip_and_vary():
  ex = blocky_example(120, 160)
  sizes, flips = set(), 0
  for seed in range(20):
    out, _ = transforms.train_example(ex, np.random.default_rng(seed), recipe="lsj", canvas=(64, 64),
                                      max_instances=8, num_classes=7)
    sizes.add(tuple(out["image_size"]))
  assert len(sizes) > 5
  for seed in range(40):
    _, _, flip = transforms.coco_detr_geometry(np.random.default_rng(seed), (480, 640), (1344, 1344))
    flips += flip
  assert 8 < flips < 32


def test_coco_detr_sizes_at_original_canvas():
  shorts = set()
  for seed in range(200):
    box, (h, w), _ = transforms.coco_detr_geometry(np.random.default_rng(seed), (480, 640),
                                                   (1344, 1344))
    assert max(h, w) <= 1333 and 0 <= box[0] < box[2] <= 480 and 0 <= box[1] < box[3] <= 640
    if box == (0, 0, 480, 640):  # no crop: shortest edge one of 480..800 step 32
      assert min(h, w) in range(480, 801, 32) and abs(w / h - 640 / 480) < 0.01
    shorts.add(min(h, w))
  assert {480, 800} <= shorts  # both ends reached
  # The crop branch: crops of 384..600 in the 400/500/600 resize, i.e. smaller boxes of the original.
  crops = [transforms.coco_detr_geometry(np.random.default_rng(s), (480, 640), (1344, 1344))[0]
           for s in range(200)]
  assert sum(b != (0, 0, 480, 640) for b in crops) > 60


def test_coco_detr_max1000_for_swin_l():
  """The original's Swin-L COCO recipe: the same DETR sizes with the longest edge <= 1000, on its own
  1024 canvas (not scaled down by the 1344 reference)."""
  geometry, _ = transforms.RECIPES["coco_detr_max1000"]
  longs, shorts = [], set()
  for seed in range(200):
    box, (h, w), _ = geometry(np.random.default_rng(seed), (480, 960), (1024, 1024))
    longs.append(max(h, w))
    if box == (0, 0, 480, 960):  # no crop: 2:1, so the 1000 cap binds for every shortest edge > 500
      shorts.add(min(h, w))
  assert max(longs) == 1000
  assert shorts == {480, 500}  # 480 fits (960 long); 512..800 are all capped to 1000 x 500
  out, _ = transforms.train_example(blocky_example(120, 160), np.random.default_rng(0),
                                    recipe="coco_detr_max1000", canvas=(1024, 1024), max_instances=8,
                                    num_classes=7)
  check_contract(out, (1024, 1024), 8, 7)


def test_lsj_and_ade20k_sizes():
  for seed in range(100):
    rng = np.random.default_rng(seed)
    box, (h, w), _ = transforms.lsj_geometry(rng, (480, 640), (1024, 1024))
    assert h <= 1024 and w <= 1024 and w >= 0.1 * 1024 * 0.99
    box, (h, w), _ = transforms.ade20k_geometry(rng, (300, 400), (512, 512))
    assert h <= 512 and w <= 512
  # LSJ at scale 2 of a 1024 canvas crops 1024x1024 from a 1536x2048 resize: the box is part of the image
  box, out, _ = transforms.lsj_geometry(np.random.default_rng(1), (480, 640), (1024, 1024))
  assert out[0] <= 1024


def test_eval_resize_matches_detectron2():
  assert transforms.shortest_edge_size(480, 640, 800, 1333) == (800, 1067)
  assert transforms.shortest_edge_size(300, 1000, 800, 1333) == (400, 1333)
  ex = blocky_example(48, 64)
  out, _ = transforms.eval_example(ex, canvas=(96, 128), min_size=80, max_size=200, max_instances=8,
                                   num_classes=7)
  assert out["image_size"].tolist() == [80, 107] and out["orig_size"].tolist() == [48, 64]
  check_contract(out, (96, 128), 8, 7)
  # Too small a canvas: shrunk to fit, never cut.
  out, _ = transforms.eval_example(ex, canvas=(64, 64), min_size=80, max_size=200, max_instances=8,
                                   num_classes=7)
  assert out["image_size"].tolist() == [48, 64]


def test_color_aug_ssd_changes_colours_only():
  img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
  outs = [transforms.color_aug_ssd(img, np.random.default_rng(s)) for s in range(8)]
  assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
  assert sum(not np.array_equal(o, img) for o in outs) >= 6


def test_finalize_overflow_keeps_largest():
  seg = np.array([[0, 0, 0, 1], [2, 2, -1, 1], [3, 3, 3, 3]], np.int32)
  out, labels, valid, overflow = transforms.finalize(seg, np.array([10, 11, 12, 13]), 2, 20)
  assert overflow == 2
  np.testing.assert_array_equal(out, [[0, 0, 0, -1], [-1, -1, -1, -1], [1, 1, 1, 1]])
  assert labels.tolist() == [10, 13] and valid.tolist() == [True, True]


@given(st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_finalize_properties(m, seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(0, 10))
  seg = rng.integers(-1, n, (9, 7)).astype(np.int32) if n else np.full((9, 7), -1, np.int32)
  labels_in = rng.integers(0, 4, n).astype(np.int32)
  out, labels, valid, overflow = transforms.finalize(seg, labels_in, m, 4)
  present = np.unique(seg[seg >= 0])
  assert valid.sum() == min(len(present), m) and overflow == max(0, len(present) - m)
  assert (labels[~valid] == 4).all()
  for s in np.flatnonzero(valid):  # each slot is exactly one original segment, with its label
    orig = np.unique(seg[out == s])
    assert len(orig) == 1 and labels[s] == labels_in[orig[0]]
  dropped = (seg >= 0) & (out == -1)
  if m >= len(present):
    assert not dropped.any()
  else:  # kept segments are at least as large as dropped ones
    counts = np.bincount(seg[seg >= 0], minlength=n)
    kept = {int(np.unique(seg[out == s])[0]) for s in range(m)}
    assert min(counts[list(kept)]) >= max(counts[np.setdiff1d(present, list(kept))])


def test_padding_example():
  out = transforms.padding_example((32, 48), 5, 7)
  check_contract(dict(out, image_size=np.array([32, 48])), (32, 48), 5, 7)
  assert out["image_id"] == -1 and not out["valid"].any()
