"""COCO panoptic / ADE20K sources: decoded targets against hand-made JSON, and every kind of bad input."""
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from maskformer_jax.config import base_config
from maskformer_jax.data import pipeline, transforms
from maskformer_jax.data.ade20k import Ade20kSource
from maskformer_jax.data.coco_panoptic import BadInputError, CocoPanopticSource, id_to_rgb

CATS = [{"id": 1, "name": "circle", "isthing": 1}, {"id": 3, "name": "square", "isthing": 1},
        {"id": 10, "name": "sky", "isthing": 0}, {"id": 20, "name": "ground", "isthing": 0}]
CONTIG = {1: 0, 3: 1, 10: 2, 20: 3}


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _jpeg(array, mode="RGB"):
  buf = io.BytesIO()
  Image.fromarray(array).convert(mode).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def write_coco(root, entries, split="val2017", categories=CATS):
  """entries: dicts with id, image (bytes), png (bytes or None for no file), segments_info."""
  for sub in (split, f"panoptic_{split}", "annotations"):
    (root / sub).mkdir(parents=True, exist_ok=True)
  images, anns = [], []
  for e in entries:
    name = f"{e['id']:06d}"
    if e["image"] is not None:
      (root / split / f"{name}.jpg").write_bytes(e["image"])
    if e["png"] is not None:
      (root / f"panoptic_{split}" / f"{name}.png").write_bytes(e["png"])
    images.append({"id": e["id"], "file_name": f"{name}.jpg", "height": 8, "width": 10})
    if e.get("annotated", True):
      anns.append({"image_id": e["id"], "file_name": f"{name}.png",
                   "segments_info": e["segments_info"]})
  (root / "annotations" / f"panoptic_{split}.json").write_text(
      json.dumps({"images": images, "annotations": anns, "categories": categories}))
  return root


def hand_made():
  """8x10: sky (id 300 > 255) on top, ground (id 70000) below, two circles, one square, one crowd
  circle, a void strip."""
  ids = np.zeros((8, 10), np.int32)
  ids[:3] = 300
  ids[3:] = 70000
  ids[4:6, 1:3] = 5  # circle 1
  ids[4:7, 6:9] = 6  # circle 2
  ids[1:3, 4:6] = 7  # square
  ids[6:8, 0:2] = 8  # crowd circle
  ids[:, 9] = 0  # void
  info = [{"id": 300, "category_id": 10, "iscrowd": 0, "area": 27},
          {"id": 70000, "category_id": 20, "iscrowd": 0, "area": 0},
          {"id": 5, "category_id": 1, "iscrowd": 0, "area": 4},
          {"id": 6, "category_id": 1, "iscrowd": 0, "area": 9},
          {"id": 7, "category_id": 3, "iscrowd": 0, "area": 4},
          {"id": 8, "category_id": 1, "iscrowd": 1, "area": 4}]
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)
  return image, ids, info


@pytest.fixture
def hand_root(tmp_path):
  image, ids, info = hand_made()
  return write_coco(tmp_path, [{"id": 42, "image": _png(image), "png": _png(id_to_rgb(ids)),
                                "segments_info": info}])


def test_categories_contiguous_with_thing_flag(hand_root):
  src = CocoPanopticSource(hand_root, "val2017")
  assert [(c["id"], c["contiguous_id"], c["isthing"]) for c in src.categories] == [
      (1, 0, 1), (3, 1, 1), (10, 2, 0), (20, 3, 0)]
  assert src.is_thing.tolist() == [True, True, False, False]


def test_decoded_targets_match_json(hand_root):
  image, ids, info = hand_made()
  ex = CocoPanopticSource(hand_root, "val2017")[0]
  assert ex["image_id"] == 42
  np.testing.assert_array_equal(ex["image"], image)  # PNG-encoded image: lossless
  seg, lab = ex["segments"], ex["seg_labels"]
  # Per pixel, the class decoded from the PNG equals the JSON's category of that pixel's id.
  want = np.full(ids.shape, -1)
  for s in info:
    if not s["iscrowd"]:
      want[ids == s["id"]] = CONTIG[s["category_id"]]
  got = np.where(seg >= 0, lab[np.maximum(seg, 0)], -1)
  np.testing.assert_array_equal(got, want)
  # Each non-crowd segment is exactly one index (two circles stay two instances).
  for s in info:
    vals = np.unique(seg[ids == s["id"]])
    assert len(vals) == 1 and (vals[0] >= 0) == (not s["iscrowd"])
  assert len(lab) == 5 and sorted(lab.tolist()) == [0, 0, 1, 2, 3]


def test_batch_contract_from_hand_made(hand_root):
  ex = CocoPanopticSource(hand_root, "val2017")[0]
  out, overflow = transforms.eval_example(ex, canvas=(16, 32), min_size=8, max_size=100,
                                          max_instances=8, num_classes=4)
  _, ids, info = hand_made()
  assert overflow == 0
  assert out["image_size"].tolist() == [8, 10] and out["orig_size"].tolist() == [8, 10]
  assert out["segments"].shape == (16, 32) and (out["segments"][8:] == -1).all()
  assert (out["segments"][:, 10:] == -1).all() and (out["image"][8:] == 0).all()
  assert out["valid"].sum() == 5 and (out["labels"][~out["valid"]] == 4).all()
  for s in info:  # every JSON segment's mask is one slot with its class; crowd none
    m = ids == s["id"]
    slot = np.unique(out["segments"][:8, :10][m])
    assert len(slot) == 1
    if s["iscrowd"]:
      assert slot[0] == -1
    else:
      assert out["valid"][slot[0]] and out["labels"][slot[0]] == CONTIG[s["category_id"]]
      np.testing.assert_array_equal(out["segments"][:8, :10] == slot[0], m)


def test_ground_truth_original_resolution(hand_root):
  src = CocoPanopticSource(hand_root, "val2017")
  idmap, segs = src.ground_truth(42)
  _, ids, info = hand_made()
  assert idmap.dtype == np.int32
  np.testing.assert_array_equal(idmap, ids)  # 70000 survives: no uint8 wrap
  assert [(s["id"], s["category_id"], s["iscrowd"], s["isthing"]) for s in segs] == [
      (s["id"], CONTIG[s["category_id"]], s["iscrowd"], s["category_id"] < 10) for s in info]


def test_overflow_keeps_largest_and_logs(tmp_path, caplog):
  ids = np.zeros((8, 10), np.int32)
  areas = {}
  for k in range(6):  # segment k+1 covers k+1 columns of rows k..k+1: areas 2, 4, ..., 12
    ids[k:k + 2, :k + 1] = k + 1
  for k in range(6):
    areas[k + 1] = int((ids == k + 1).sum())
  info = [{"id": k, "category_id": 1 if k % 2 else 3, "iscrowd": 0, "area": a}
          for k, a in areas.items()]
  root = write_coco(tmp_path, [{"id": 1, "image": _jpeg(np.zeros((8, 10, 3), np.uint8)),
                                "png": _png(id_to_rgb(ids)), "segments_info": info}])
  c = base_config()
  c.data.root, c.model.num_classes, c.data.max_instances = str(root), 4, 3
  c.data.eval_size, c.data.eval_min_size, c.data.eval_max_size = (8, 10), 8, 10
  c.eval.batch_size, c.data.num_workers = 1, 0
  with caplog.at_level(logging.WARNING, "maskformer_jax.data"):
    (batch,) = list(pipeline.make_loader(c, "val2017", train=False, seed=0, shard_index=0,
                                         shard_count=1))
  largest = sorted(areas, key=areas.get)[-3:]
  seg = batch["segments"][0]
  assert batch["valid"][0].all()
  kept = {int(np.unique(ids[seg == s])[0]) for s in range(3)}
  assert kept == set(largest)
  assert all((seg[ids == k] == -1).all() for k in areas if k not in largest)
  assert seg.max() == 2 and seg.min() == -1
  assert any("more than max_instances=3" in r.getMessage() for r in caplog.records)


def test_root_empty_and_class_mismatch_raise(hand_root):
  c = base_config()
  with pytest.raises(ValueError, match="data.root is empty"):
    pipeline.make_source(c, "val2017")
  c.data.root = str(hand_root)
  with pytest.raises(ValueError, match="num_classes = 133 but .* 4 categories"):
    pipeline.make_source(c, "val2017")
  c.model.num_classes = 4
  assert len(pipeline.make_source(c, "val2017")) == 1


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P"])
def test_non_rgb_images_are_converted(tmp_path, mode):
  image, ids, info = hand_made()
  gray = np.full((8, 10, 3), 90, np.uint8)
  img = Image.fromarray(gray).convert(mode)
  if mode == "P":  # an explicit palette: RGB->P conversion would dither
    img = Image.fromarray(np.zeros((8, 10), np.uint8), "P")
    img.putpalette([90, 90, 90] * 256)
  buf = io.BytesIO()
  img.save(buf, format="JPEG" if mode in ("L", "CMYK") else "PNG")
  root = write_coco(tmp_path, [{"id": 1, "image": buf.getvalue(), "png": _png(id_to_rgb(ids)),
                                "segments_info": info}])
  ex = CocoPanopticSource(root, "val2017", bad_input="raise")[0]
  assert ex["image"].shape == (8, 10, 3) and ex["image"].dtype == np.uint8
  assert np.abs(ex["image"].astype(int) - 90).max() <= 3


def _bad_entries():
  image, ids, info = hand_made()
  good = {"image": _jpeg(image), "png": _png(id_to_rgb(ids)), "segments_info": info}
  jpeg = _jpeg(image)
  png = _png(id_to_rgb(ids))
  extra = ids.copy()
  extra[0, 0] = 999  # id absent from the JSON
  return {
      "corrupt_jpeg": (dict(good, image=b"\xff\xd8\xff\xe0 not a jpeg" * 10), "unreadable_image"),
      "empty_jpeg": (dict(good, image=b""), "empty_file"),  # cv2.error in OpenCV 5, not a crash
      "empty_png": (dict(good, png=b""), "empty_file"),
      "truncated_jpeg": (dict(good, image=jpeg[:len(jpeg) // 2]), "unreadable_image"),
      "jpeg_without_tail": (dict(good, image=jpeg[:-40]), "unreadable_image"),
      "truncated_png": (dict(good, png=png[:len(png) // 2]), "unreadable_image"),
      "missing_image": (dict(good, image=None), "missing_file"),
      "missing_png": (dict(good, png=None), "missing_file"),
      "png_id_not_in_json": (dict(good, png=_png(id_to_rgb(extra))), "png_ids_not_in_json"),
      "unknown_category": (dict(good, segments_info=[dict(s, category_id=77) if s["id"] == 5 else s
                                                     for s in info]), "unknown_category"),
      "no_segments": (dict(good, png=_png(id_to_rgb(np.zeros_like(ids))), segments_info=[]),
                      "no_segments"),
      "no_annotation_row": (dict(good, annotated=False), "missing_annotation"),
  }


@pytest.mark.parametrize("case", sorted(_bad_entries()))
def test_bad_input_skip_and_raise(tmp_path, case, caplog):
  entry, kind = _bad_entries()[case]
  image, ids, info = hand_made()
  good = {"image": _jpeg(image), "png": _png(id_to_rgb(ids)), "segments_info": info}
  root = write_coco(tmp_path, [dict(good, id=1), dict(entry, id=2), dict(good, id=3)])
  src = CocoPanopticSource(root, "val2017", bad_input="skip", require_segments=True)
  with caplog.at_level(logging.WARNING, "maskformer_jax.data"):
    rec = src[1]
  assert rec == {"image_id": 2, "skip": kind}
  assert src.policy.counts == {kind: 1}
  assert any("000002" in r.getMessage() and kind in r.getMessage() for r in caplog.records)
  assert "skip" not in src[0] and "skip" not in src[2]
  with pytest.raises(BadInputError, match=f"000002.*{kind}") as e:
    CocoPanopticSource(root, "val2017", bad_input="raise", require_segments=True)[1]
  assert e.value.kind == kind
  # Through the pipeline: training drops it, eval turns it into a padding example; never NaN-prone.
  c = base_config()
  c.data.root, c.model.num_classes, c.data.max_instances, c.data.num_workers = str(root), 4, 8, 0
  c.data.image_size = c.data.eval_size = (16, 16)
  c.data.eval_min_size = c.data.eval_max_size = 16
  c.batch_size, c.eval.batch_size = 2, 4
  (batch,) = list(pipeline.make_loader(c, "val2017", train=True, seed=0, shard_index=0,
                                       shard_count=1, num_epochs=1))
  assert sorted(batch["image_id"].tolist()) == [1, 3] and batch["valid"].any(1).all()
  (batch,) = list(pipeline.make_loader(c, "val2017", train=False, seed=0, shard_index=0,
                                       shard_count=1))
  # An image without segments is still evaluated (all void); every other bad input is padding.
  assert batch["image_id"].tolist() == [1, 2 if kind == "no_segments" else -1, 3, -1]
  assert not batch["valid"][[1, 3]].any() and (batch["segments"][[1, 3]] == -1).all()


def test_empty_image_in_eval_has_no_targets(tmp_path):
  """No segment at all: kept for eval (all void), every slot invalid, labels = K, nothing to divide."""
  root = write_coco(tmp_path, [{"id": 1, "image": _jpeg(np.zeros((8, 10, 3), np.uint8)),
                                "png": _png(id_to_rgb(np.zeros((8, 10), np.int32))),
                                "segments_info": []}])
  ex = CocoPanopticSource(root, "val2017", bad_input="raise")[0]
  out, _ = transforms.eval_example(ex, canvas=(16, 16), min_size=8, max_size=16, max_instances=4,
                                   num_classes=4)
  assert not out["valid"].any() and (out["labels"] == 4).all() and (out["segments"] == -1).all()


def test_bad_input_policy_rejects_unknown_mode(hand_root):
  with pytest.raises(ValueError, match="data.bad_input='ignore' is not one of"):
    CocoPanopticSource(hand_root, "val2017", bad_input="ignore")


def write_ade(root, labels_list, split="validation"):
  (root / "images" / split).mkdir(parents=True)
  (root / "annotations" / split).mkdir(parents=True)
  for i, lab in enumerate(labels_list):
    name = f"ADE_val_{i + 1:08d}"
    (root / "images" / split / f"{name}.jpg").write_bytes(_jpeg(np.zeros((*lab.shape, 3), np.uint8)))
    (root / "annotations" / split / f"{name}.png").write_bytes(_png(lab))
  return root


def test_ade20k_one_target_per_class_ignore_excluded(tmp_path):
  lab = np.zeros((8, 10), np.uint8)  # 0 = ignore
  lab[:4] = 3
  lab[4:, :5] = 150
  lab[4:, 5:7] = 3  # class 3 twice, not connected: still one target
  root = write_ade(tmp_path, [lab, np.full((8, 10), 151, np.uint8)])
  src = Ade20kSource(root, "validation", bad_input="skip")
  assert len(src) == 2 and src.categories[149]["name"] == "flag"
  ex = src[0]
  assert ex["image_id"] == 1
  out, _ = transforms.eval_example(ex, canvas=(8, 10), min_size=8, max_size=10, max_instances=150,
                                   num_classes=150)
  assert out["valid"].sum() == 2
  assert out["labels"][:2].tolist() == [2, 149]
  np.testing.assert_array_equal(out["segments"] == 0, lab == 3)
  np.testing.assert_array_equal(out["segments"] == -1, lab == 0)
  gt = src.ground_truth(1)
  np.testing.assert_array_equal(gt, np.where(lab == 0, 255, lab.astype(np.int32) - 1))
  assert src[1] == {"image_id": 2, "skip": "unknown_category"}
  with pytest.raises(BadInputError, match="ADE_val_00000002.png: unknown_category"):
    Ade20kSource(root, "validation", bad_input="raise")[1]


@pytest.mark.slow  # ~20 s: compiles the criterion and the matcher
def test_empty_images_give_finite_loss_downstream(tmp_path):
  """A batch of images without segments plus padding examples: the criterion and its gradient stay
  finite (no target anywhere, num_masks clamped to 1)."""
  import jax
  import jax.numpy as jnp
  from maskformer_jax import criterion
  root = write_coco(tmp_path, [{"id": i, "image": _jpeg(np.zeros((8, 10, 3), np.uint8)),
                                "png": _png(id_to_rgb(np.zeros((8, 10), np.int32))),
                                "segments_info": []} for i in (1, 2)])
  c = base_config()
  c.data.root, c.model.num_classes, c.data.max_instances, c.data.num_workers = str(root), 4, 3, 0
  c.data.eval_size, c.data.eval_min_size, c.data.eval_max_size = (16, 16), 8, 16
  c.eval.batch_size = 4
  (batch,) = list(pipeline.make_loader(c, "val2017", train=False, seed=0, shard_index=0,
                                       shard_count=1))
  assert batch["image_id"].tolist() == [1, 2, -1, -1] and not batch["valid"].any()
  rng = np.random.default_rng(0)
  outputs = {"pred_logits": jnp.asarray(rng.normal(size=(4, 5, 5)), jnp.float32),
             "pred_masks": jnp.asarray(rng.normal(size=(4, 5, 4, 4)), jnp.float32)}
  b = {k: jnp.asarray(batch[k]) for k in ("segments", "labels", "valid")}

  def loss(o):
    return criterion.set_criterion(o, b, c.loss, num_masks=criterion.num_masks(b),
                                   rng=jax.random.key(0))[0]

  value, grads = jax.value_and_grad(loss)(outputs)
  assert np.isfinite(float(value))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
