"""The COCO instance source (overlapping targets in layers) against pycocotools, its geometry through the
recipes, the instance evaluator against COCOeval on the instance file, and the instance recipe end to end."""
import copy
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskformer_jax.data import coco_instance, pipeline, synthetic, transforms
from maskformer_jax.data.coco_panoptic import BadInputError
from maskformer_jax.evaluation import mask_ap

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return pathlib.Path(synthetic.generate(tmp_path_factory.mktemp("inst") / "data", num_train=24, num_val=8,
                                         image_size=(64, 64), seed=0))


def coco(data, split="train2017"):
  import contextlib
  import io
  with contextlib.redirect_stdout(io.StringIO()):
    return COCO(str(data / "annotations" / f"instances_{split}.json"))


def test_every_instance_mask_is_pycocotools_own(data):
  """Slot n's target (the OR over the layers) is pycocotools' annToMask of the image's n-th non-crowd
  annotation, pixel for pixel; crowd annotations are no target; the synthetic masks do overlap."""
  src = coco_instance.CocoInstanceSource(data, "train2017", bad_input="raise")
  gt = coco(data)
  assert [c["id"] for c in src.categories] == sorted(gt.cats) and src.is_thing.all()
  overlap = crowd = 0
  for i in range(len(src)):
    ex, image_id = src[i], int(src.image_ids[i])
    anns = gt.imgToAnns[image_id]
    crowd += sum(a["iscrowd"] for a in anns)
    anns = [a for a in anns if not a["iscrowd"]]
    seg = ex["segments"]
    assert seg.shape == (64, 64, 4) and seg.dtype == np.int32 and ex["image_id"] == image_id
    assert ex["seg_labels"].tolist() == [src.categories[[c["id"] for c in src.categories].index(
        a["category_id"])]["contiguous_id"] for a in anns]
    for n, a in enumerate(anns):
      np.testing.assert_array_equal((seg == n).any(-1), gt.annToMask(a).astype(bool), err_msg=f"{i}/{n}")
    assert seg.max() < len(anns)
    overlap += int(((seg >= 0).sum(-1) >= 2).sum())
  assert overlap > 100 and crowd >= 1


def test_deeper_overlaps_than_the_layers_are_counted_and_logged(data, caplog):
  """With one layer a pixel keeps its first instance; the others lose it, counted exactly and logged."""
  gt = coco(data)
  one = coco_instance.CocoInstanceSource(data, "train2017", bad_input="raise", layers=1)
  expected = 0
  with caplog.at_level(logging.WARNING, "maskformer_jax.data"):
    for i in range(len(one)):
      anns = [a for a in gt.imgToAnns[int(one.image_ids[i])] if not a["iscrowd"]]
      cover = sum(gt.annToMask(a).astype(int) for a in anns) if anns else 0
      expected += int(np.maximum(np.asarray(cover) - 1, 0).sum())
      seg = one[i]["segments"]
      assert seg.shape == (64, 64, 1)
      for n, a in enumerate(anns):  # an instance keeps exactly the pixels no earlier one took
        earlier = sum((gt.annToMask(b) for b in anns[:n]), np.zeros((64, 64), np.uint8)) > 0
        np.testing.assert_array_equal(seg[..., 0] == n, gt.annToMask(a).astype(bool) & ~earlier)
  assert expected > 0 and one.dropped_pixels == expected
  assert "more than data.instance_layers=1 instances" in caplog.text
  with pytest.raises(ValueError, match="instance_layers=0"):
    coco_instance.CocoInstanceSource(data, "train2017", layers=0)


def write_variant(data, tmp_path, edit):
  """A copy of the dataset whose train instance JSON `edit(d)` changed."""
  root = tmp_path / "variant"
  shutil.copytree(data, root)
  path = root / "annotations" / "instances_train2017.json"
  d = json.loads(path.read_text())
  edit(d)
  path.write_text(json.dumps(d))
  return root


def test_bad_annotations_name_the_file_and_spoil_only_their_image(data, tmp_path):
  first = {}

  def edit(d):
    a = d["annotations"]
    first.update(bad=a[0]["image_id"], unknown=a[-1]["image_id"])
    a[0]["segmentation"] = "oops"
    a[-1]["category_id"] = 99
    a.append({"id": 10**6, "image_id": a[5]["image_id"], "category_id": 1, "iscrowd": 0, "area": 1.0,
              "bbox": [0, 0, 1, 1], "segmentation": [[1.0, 1.0, 2.0, 2.0]]})  # 2 points: dropped
    a.append({"id": 10**6 + 1, "image_id": 123456, "category_id": 1, "segmentation": []})
    d["images"][3]["height"] = 65  # the image file is 64 high
  root = write_variant(data, tmp_path, edit)
  src = coco_instance.CocoInstanceSource(root, "train2017", bad_input="raise")
  assert src.invalid_polygons == 1
  assert [k for k, _, m in src.annotation_problems if "123456" in m] == ["bad_annotation"]
  index = {int(i): k for k, i in enumerate(src.image_ids)}
  with pytest.raises(BadInputError, match=r"instances_train2017\.json: bad_annotation: .*segmentation"):
    src[index[first["bad"]]]
  with pytest.raises(BadInputError, match="category_id 99, which is not in 'categories'"):
    src[index[first["unknown"]]]
  with pytest.raises(BadInputError, match=r"000000000004\.jpg: size_mismatch"):
    src[3]
  skipping = coco_instance.CocoInstanceSource(root, "train2017", bad_input="skip")
  assert skipping[3] == {"image_id": 4, "skip": "size_mismatch"}
  spoiled = {index[first["bad"]], index[first["unknown"]], 3}
  assert all("segments" in skipping[i] for i in range(len(skipping)) if i not in spoiled)
  with pytest.raises(FileNotFoundError, match=r"instances_test2017\.json not found"):
    coco_instance.CocoInstanceSource(root, "test2017")
  (root / "annotations" / "instances_train2017.json").write_text("{}")
  with pytest.raises(ValueError, match="COCO instances format"):
    coco_instance.CocoInstanceSource(root, "train2017")


@pytest.mark.parametrize("recipe", ["lsj", "coco_detr", "ade20k"])
def test_each_instance_keeps_its_whole_mask_through_a_recipe(data, recipe):
  """The layered map through a recipe's geometry equals each instance's own mask taken through the same
  crop, nearest resize and flip: overlapping targets survive augmentation whole."""
  src = coco_instance.CocoInstanceSource(data, "train2017", bad_input="raise")
  for i in range(6):
    ex = src[i]
    seed = np.random.default_rng(i)
    out, overflow = transforms.train_example(ex, copy.deepcopy(seed), recipe=recipe, canvas=(64, 64),
                                             max_instances=8, num_classes=3)
    box, out_hw, flip = transforms.RECIPES[recipe][0](copy.deepcopy(seed), ex["image"].shape[:2], (64, 64))
    assert out["segments"].shape == (64, 64, 4) and overflow == 0
    kept = 0
    for n in range(len(ex["seg_labels"])):
      own = (ex["segments"] == n).any(-1).astype(np.int32) - 1  # -1 / 0
      _, moved = transforms.crop_resize(ex["image"], own, box, out_hw, flip)
      moved = moved >= 0
      if not moved.any():
        continue
      slot = (out["segments"][:out_hw[0], :out_hw[1]] == kept).any(-1)
      np.testing.assert_array_equal(slot, moved, err_msg=f"image {i} instance {n}")
      assert out["labels"][kept] == ex["seg_labels"][n] and out["valid"][kept]
      kept += 1
    assert out["valid"].sum() == kept and (out["segments"][out_hw[0]:] == -1).all()


def test_eval_batches_pad_with_layered_fillers(data, tmp_path):
  """A skipped eval image becomes a padding example shaped like the source's (layers included)."""
  from maskformer_jax.config import load_config
  root = tmp_path / "broken"
  shutil.copytree(data, root)
  (root / "val2017" / "000000000026.jpg").write_bytes(b"")
  config = load_config(f"{ROOT}/configs/mask2former.py:task=coco_instance,runlocal")
  with config.unlocked():
    config.data.root = str(root)
  batches = list(pipeline.make_loader(config, "val2017", train=False, seed=0, shard_index=0, shard_count=1))
  segs = np.concatenate([b["segments"] for b in batches])
  ids = np.concatenate([b["image_id"] for b in batches]).tolist()
  assert segs.shape == (8, 64, 64, 4) and ids == [25, -1, 27, 28, 29, 30, 31, 32]
  assert (segs[1] == -1).all() and (segs[0] >= 0).any()


def test_instance_evaluator_equals_cocoeval_on_the_instance_file(data):
  """The accumulator fed by the source's instance_annotations gives COCOeval's numbers on the JSON file
  itself (crowd annotations included), for detections that hit, miss and land on crowd regions."""
  src = coco_instance.CocoInstanceSource(data, "val2017", bad_input="raise")
  gt = coco(data, "val2017")
  rng = np.random.default_rng(0)
  acc, results = mask_ap.MaskAPAccumulator(src.categories), []
  for image_id in src.image_ids.tolist():
    size, anns = src.instance_annotations(image_id)
    assert len(anns) == len(gt.imgToAnns[image_id])
    masks, scores, cats = [], [], []
    for a in gt.imgToAnns[image_id]:
      m = gt.annToMask(a).astype(bool)
      if rng.random() < 0.5:  # a shifted copy: a partial hit
        m = np.roll(m, int(rng.integers(1, 5)), axis=1)
      masks.append(m), scores.append(float(rng.uniform(0.1, 1))), cats.append(a["category_id"])
    masks.append(rng.random(size) < 0.05), scores.append(0.3), cats.append(1)  # a false positive
    acc.add_instances(image_id, size, anns, np.array(masks), np.array(scores), np.array(cats))
    results += mask_ap.detections(image_id, masks, scores, cats)
  ours = acc.gathered().stats()
  import contextlib
  import io
  with contextlib.redirect_stdout(io.StringIO()):
    ev = COCOeval(gt, gt.loadRes(results), iouType="segm")
    ev.evaluate(), ev.accumulate(), ev.summarize()
  np.testing.assert_allclose(ours, ev.stats, atol=1e-12)
  assert 0.2 < ours[0] < 0.95  # neither trivial nor perfect
  image_id = int(src.image_ids[0])
  for a, ref in zip(src.instance_annotations(image_id)[1], gt.imgToAnns[image_id]):
    assert isinstance(a["segmentation"]["counts"], str)  # JSON-ready, picklable across hosts
    rle = dict(a["segmentation"], counts=a["segmentation"]["counts"].encode())
    np.testing.assert_array_equal(mask_util.decode(rle), gt.annToMask(ref))
    assert (a["area"], a["bbox"], a["iscrowd"]) == (ref["area"], ref["bbox"], ref["iscrowd"])


def test_config_rejects_panoptic_evaluators_on_instance_data():
  from maskformer_jax.config import load_config, validate
  demo = load_config(f"{ROOT}/configs/demo.py:arch=mask2former,task=instance")
  validate(demo, num_devices=1, num_processes=1)
  assert (demo.data.dataset, demo.model.num_classes, demo.evals.val.type) == ("coco_instance", 3, "instance")
  config = load_config(f"{ROOT}/configs/mask2former.py:task=coco_instance,runlocal")
  with config.unlocked():
    config.evals.val.type = "panoptic"
  with pytest.raises(ValueError, match="coco_instance source has instance annotations only"):
    validate(config, num_devices=1, num_processes=1)


@pytest.mark.slow
def test_instance_recipe_trains_scores_and_predicts_end_to_end(data, tmp_path):
  """The demo's Mask2Former on the instance annotations (configs/demo.py:arch=mask2former,task=instance),
  80 steps on 2 devices: the layered targets through the sharded train step, a model that learns (mask
  AP well above 0 on the held-out images), scored against the instance file; then `predict` from the
  checkpoint writes COCO instance results, which the standalone tool scores to the same AP."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  workdir = tmp_path / "run"

  def run(*args):
    r = subprocess.run([sys.executable, "-m", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r

  run("maskformer_jax.train", f"--config={ROOT}/configs/demo.py:arch=mask2former,task=instance",
      f"--workdir={workdir}", f"--config.data.root={data}", "--config.total_steps=80",
      "--config.evals.val.every=80", "--config.train.checkpoint_every=80", "--config.optim.warmup_steps=10")
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [row for row in rows if "loss" in row]
  evals = [row for row in rows if row.get("eval") == "val"]
  assert train and all(np.isfinite(row["loss"]) for row in train)
  assert evals[-1]["step"] == 80 and evals[-1]["num_images"] == 8
  assert set(mask_ap.METRICS) <= set(evals[-1]) and evals[-1]["ap"] > 5  # 8.8 measured

  out = tmp_path / "pred"
  r = run("maskformer_jax.predict", f"--checkpoint={workdir}", f"--images={data / 'val2017' / '*.jpg'}",
          f"--out={out}")
  assert f"{out}/instances.json" in r.stdout
  pred = json.loads((out / "predictions.json").read_text())
  detections = json.loads((out / "instances.json").read_text())
  assert pred["task"] == "instance" and len(pred["annotations"]) == 8 and not (out / "panoptic").exists()
  assert {d["image_id"] for d in detections} == set(range(25, 33))
  assert {d["category_id"] for d in detections} <= {1, 2, 3}
  assert all((out / "overlays" / f"{i:012d}.png").exists() for i in range(25, 33))
  run("maskformer_jax.tools.instance_eval", f"--gt={data}/annotations/instances_val2017.json",
      f"--pred={out}/instances.json", f"--out={tmp_path}/ap.json")
  scored = json.loads((tmp_path / "ap.json").read_text())
  assert scored["ap"] == pytest.approx(evals[-1]["ap"], abs=0.05), (scored, evals[-1])


def test_data_check_reports_instance_problems(data, tmp_path):
  import io
  from maskformer_jax.config import load_config
  from maskformer_jax.data import check

  def edit(d):
    d["annotations"][0]["segmentation"] = [[1, 2, 3, 4]]
    d["annotations"][1]["category_id"] = 77
    d["annotations"].append({"image_id": 999, "category_id": 1, "segmentation": []})
    d["images"].append(dict(d["images"][0]))  # listed twice
  config = load_config(f"{ROOT}/configs/mask2former.py:task=coco_instance,runlocal")
  with config.unlocked():
    config.data.root = str(write_variant(data, tmp_path, edit))
  out = io.StringIO()
  counts = check.check_split(config, "train2017", out=out)
  # the first listing of the duplicate gets no annotation (they go to the last): no_segments
  assert counts == {"bad_annotation": 2, "invalid_polygons": 1, "duplicate_image_id": 1, "no_segments": 1}, (
      out.getvalue())
  assert "image_id 999 is not in 'images'" in out.getvalue() and "category_id 77" in out.getvalue()


def test_layered_train_step_is_the_same_on_1_and_8_devices(data):
  """One Mask2Former step on instance targets ([B, H, W, 4] from the source through the LSJ recipe) gives
  the same loss terms and gradient norm on one device as sharded over eight."""
  import jax
  from maskformer_jax import sharding
  from maskformer_jax import train_step as ts
  from maskformer_jax.config import load_config
  from maskformer_jax.models import build_model
  config = load_config(f"{ROOT}/configs/mask2former.py:task=coco_instance,runlocal")
  config.batch_size, config.model.backbone_norm = 8, "frozen_bn"
  src = coco_instance.CocoInstanceSource(data, "train2017", bad_input="raise")
  examples = [transforms.train_example(src[i], np.random.default_rng(i), recipe="lsj", canvas=(64, 64),
                                       max_instances=8, num_classes=3)[0] for i in range(8)]
  batch = {k: np.stack([e[k] for e in examples]) for k in ("image", "segments", "labels", "valid",
                                                             "image_size")}
  assert batch["segments"].shape == (8, 64, 64, 4) and (((batch["segments"] >= 0).sum(-1)) >= 2).any()
  model = build_model(config.model)
  results = []
  for n in (1, 8):
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:n])
    state = ts.init_state(config, model, mesh, jax.random.key(0))
    _, metrics = ts.make_train_step(config, model, mesh)(state, ts.shard_batch(batch, mesh))
    results.append(jax.device_get(metrics))
  for k in ("loss", "loss_ce", "loss_mask", "loss_dice", "loss_mask_0", "grad_norm", "num_masks"):
    np.testing.assert_allclose(results[1][k][0], results[0][k][0], rtol=1e-5, err_msg=k)
  assert np.isfinite(results[0]["loss"][0])
