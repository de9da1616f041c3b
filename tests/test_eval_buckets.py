"""Size-bucketed evaluation (data.eval_buckets): each image on a canvas of its own test size rounded up
to data.eval_size_divisibility, never shrunk, as the original evaluates one image at a time.

A small COCO-format split of mixed sizes (the synthetic generator's drawing) with the test resize
shortest edge 32, longest <= 64, so the canvases stay tiny: landscape -> 32x64, portrait -> 64x32,
square -> 32x32.
"""
import json
import logging
import pathlib

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest
from PIL import Image

from _multihost_worker import FAST_COMPILE
from maskformer_jax import inference
from maskformer_jax import sharding
from maskformer_jax import train_step as train_step_lib
from maskformer_jax.config import base_config, load_config, validate
from maskformer_jax.data import pipeline, synthetic, transforms
from maskformer_jax.data.ade20k import Ade20kSource
from maskformer_jax.data.coco_panoptic import CocoPanopticSource
from maskformer_jax.evaluation import panoptic
from maskformer_jax.evaluation.pq import PQAccumulator
from maskformer_jax.models import build_model

ROOT = pathlib.Path(__file__).parent.parent
# (h, w) of the originals, and the canvas each gets at divisibility 32 (test resize 32 / 64).
SIZES = [(24, 32), (32, 24), (32, 32), (20, 60), (48, 64), (64, 40), (36, 48), (30, 20), (40, 40)]
CANVASES = [(32, 64), (64, 32), (32, 32), (32, 64), (32, 64), (64, 32), (32, 64), (64, 32), (32, 32)]


def write_split(root, sizes, split="val2017", seed=0):
  """A COCO panoptic split with one synthetic image of each size (ids 1..n)."""
  root = pathlib.Path(root)
  for sub in (split, f"panoptic_{split}", "annotations"):
    (root / sub).mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  images, annotations = [], []
  for image_id, (h, w) in enumerate(sizes, 1):
    image, idmap, info = synthetic.render(rng, h, w)
    stem = f"{image_id:012d}"
    Image.fromarray(image).save(root / split / f"{stem}.jpg", quality=95)
    Image.fromarray(synthetic._rgb_from_id(idmap)).save(root / f"panoptic_{split}" / f"{stem}.png")
    images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": h, "width": w})
    annotations.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": info})
  categories = [{k: v for k, v in c.items() if k != "color"} for c in synthetic.CATEGORIES]
  (root / "annotations" / f"panoptic_{split}.json").write_text(
      json.dumps({"images": images, "annotations": annotations, "categories": categories}))
  return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return write_split(tmp_path_factory.mktemp("mixed"), SIZES)


def cfg(root=""):
  c = load_config(f"{ROOT}/configs/coco_panoptic.py:runlocal")
  c.data.root = str(root)
  c.data.eval_min_size, c.data.eval_max_size = 32, 64
  c.eval.batch_size = 4
  return c


def test_canvas_of_landscape_portrait_and_tiny_images():
  d = base_config().data  # COCO: shortest edge 800, longest <= 1333, divisibility 32
  assert d.eval_buckets and d.eval_size_divisibility == 32
  assert pipeline.eval_canvas(d, (480, 640)) == (800, 1088)  # test size 800x1067
  assert pipeline.eval_canvas(d, (640, 480)) == (1088, 800)  # portrait: 1067x800, not shrunk to 800x600
  assert pipeline.eval_canvas(d, (427, 640)) == (800, 1216)  # 800x1199
  assert pipeline.eval_canvas(d, (200, 1000)) == (288, 1344)  # longest edge binds: 267x1333
  assert pipeline.eval_canvas(d, (3, 4)) == (800, 1088)  # tiny images are enlarged like any other
  assert pipeline.eval_canvas(d, (0, 0)) == (800, 800)  # unknown size: as a square
  d.eval_size_divisibility = 0  # the original's COCO panoptic inference: exactly the test size
  assert pipeline.eval_canvas(d, (480, 640)) == (800, 1067)
  assert pipeline.eval_canvas(d, (640, 480)) == (1067, 800)
  assert pipeline.eval_canvas(d, (200, 1000)) == (267, 1333)
  d.eval_size_divisibility = 128
  assert pipeline.eval_canvas(d, (480, 640)) == (896, 1152)
  d.eval_buckets = False
  assert pipeline.eval_canvas(d, (640, 480)) == (800, 1344)
  d = cfg().data
  assert [pipeline.eval_canvas(d, s) for s in SIZES] == CANVASES


def test_plan_groups_by_canvas_and_batches_are_whole_on_every_host(root):
  c = cfg(root)
  src = pipeline.make_source(c, "val2017")
  plan = pipeline.eval_plan(c, src)
  assert [(canvas, idx.tolist()) for canvas, idx in plan] == [
      ((32, 32), [2, 8]), ((32, 64), [0, 3, 4, 6]), ((64, 32), [1, 5, 7])]
  assert [(canvas, idx.tolist()) for canvas, idx in pipeline.eval_plan(c, src, max_examples=3)] == [
      ((32, 32), [2]), ((32, 64), [0]), ((64, 32), [1])]
  per_host = []
  for shard in range(2):  # eval batch 4: 2 per host; every canvas filled to whole batches of 4
    batches = list(pipeline.make_loader(c, "val2017", train=False, seed=0, source=src, plan=plan,
                                        shard_index=shard, shard_count=2))
    per_host.append(batches)
    for b in batches:
      pad = b["image_id"] < 0
      assert b["image"].shape[0] == 2 and not b["valid"][pad].any() and (b["segments"][pad] == -1).all()
      for i in np.flatnonzero(~pad):  # on its own canvas, at exactly its test size
        h0, w0 = b["orig_size"][i]
        assert b["image"].shape[1:3] == CANVASES[b["image_id"][i] - 1]
        assert tuple(b["image_size"][i]) == transforms.shortest_edge_size(h0, w0, 32, 64)
  # The same canvases in the same order on both hosts (the jitted step is collective).
  assert [b["image"].shape for b in per_host[0]] == [b["image"].shape for b in per_host[1]]
  assert [b["image"].shape[1:3] for b in per_host[0]] == [(32, 32), (32, 64), (64, 32)]
  ids = [i for host in per_host for b in host for i in b["image_id"].tolist()]
  assert sorted(i for i in ids if i >= 0) == list(range(1, len(SIZES) + 1))
  assert ids.count(-1) == 3 * 4 - len(SIZES)


def test_worker_processes_keep_the_plan_order(root):
  """Grain's worker processes each take every worker_count-th record: batches are stacked after them,
  so they still hold one canvas each, whole, in plan order."""
  c = cfg(root)
  c.data.num_workers = 2
  src = pipeline.make_source(c, "val2017")
  plan = pipeline.eval_plan(c, src)
  with_workers = list(pipeline.make_loader(c, "val2017", train=False, seed=0, source=src, plan=plan,
                                           shard_index=0, shard_count=1))
  c.data.num_workers = 0
  without = list(pipeline.make_loader(c, "val2017", train=False, seed=0, source=src, plan=plan,
                                      shard_index=0, shard_count=1))
  assert len(with_workers) == len(without) == 3
  for a, b in zip(with_workers, without):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_single_canvas_mode_shrinks_and_says_so_once(root, caplog):
  c = cfg(root)
  c.data.eval_buckets, c.data.eval_size = False, (32, 64)
  src = pipeline.make_source(c, "val2017")
  with caplog.at_level(logging.WARNING, logger="maskformer_jax.data"):
    plan = pipeline.eval_plan(c, src)
  assert [(canvas, idx.tolist()) for canvas, idx in plan] == [((32, 64), list(range(len(SIZES))))]
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  assert "3 of 9 images" in warnings[0] and "image id 2: 32x24, test size 43x32" in warnings[0]
  assert "data.eval_buckets=True" in warnings[0]
  (b,) = [b for b in pipeline.make_loader(c, "val2017", train=False, seed=0, source=src, plan=plan,
                                          shard_index=0, shard_count=1) if 2 in b["image_id"]]
  assert tuple(b["image_size"][list(b["image_id"]).index(2)]) == (32, 24)  # the portrait, shrunk
  c.data.eval_buckets = True
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="maskformer_jax.data"):
    pipeline.eval_plan(c, src)
  assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_wrong_recorded_size_is_reported_when_shrunk(tmp_path, caplog):
  """Bucketing trusts the JSON's height / width; a file larger than recorded is shrunk to fit its
  canvas, and that is logged, never silent."""
  root = write_split(tmp_path, [(32, 64)])
  ann = root / "annotations" / "panoptic_val2017.json"
  d = json.loads(ann.read_text())
  d["images"][0]["height"], d["images"][0]["width"] = 32, 32  # the file is 32x64
  ann.write_text(json.dumps(d))
  c = cfg(root)
  src = pipeline.make_source(c, "val2017")
  plan = pipeline.eval_plan(c, src)
  assert plan[0][0] == (32, 32)
  with caplog.at_level(logging.WARNING, logger="maskformer_jax.data"):
    (b,) = pipeline.make_loader(c, "val2017", train=False, seed=0, source=src, plan=plan,
                                shard_index=0, shard_count=1)
  assert tuple(b["image_size"][0]) == (16, 32)
  assert any("image 1 (32x64) was evaluated shrunk" in r.getMessage() for r in caplog.records)


def test_sizes_come_from_the_json_or_the_headers(tmp_path):
  root = write_split(tmp_path / "coco", [(24, 32), (40, 20)])
  ann = root / "annotations" / "panoptic_val2017.json"
  d = json.loads(ann.read_text())
  del d["images"][1]["height"], d["images"][1]["width"]  # not recorded: read from the file's header
  ann.write_text(json.dumps(d))
  (root / "val2017" / "000000000003.jpg").write_bytes(b"")
  d["images"].append({"id": 3, "file_name": "000000000003.jpg"})  # unreadable and unrecorded: unknown
  ann.write_text(json.dumps(d))
  src = CocoPanopticSource(root, "val2017")
  np.testing.assert_array_equal(src.image_sizes(), [[24, 32], [40, 20], [0, 0]])
  ade = tmp_path / "ade"
  (ade / "images" / "validation").mkdir(parents=True)
  for name, (h, w) in (("ADE_val_00000001.jpg", (30, 50)), ("ADE_val_00000002.jpg", (70, 20))):
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(ade / "images" / "validation" / name)
  np.testing.assert_array_equal(Ade20kSource(ade, "validation").image_sizes(), [[30, 50], [70, 20]])


def test_config_checks_the_divisibility():
  def errors(**data):
    c = base_config()
    c.data.update(data)
    try:
      validate(c, num_devices=8, num_processes=1)
    except ValueError as e:
      return str(e)
    return ""
  assert errors() == errors(eval_size_divisibility=0) == errors(eval_size_divisibility=64) == ""
  assert "eval_size_divisibility=16 must be 0" in errors(eval_size_divisibility=16)
  assert "eval_size_divisibility=-32 must be 0" in errors(eval_size_divisibility=-32)
  c = load_config(f"{ROOT}/configs/coco_panoptic.py:backbone=swin_t")
  c.data.eval_size_divisibility = 0
  with pytest.raises(ValueError, match="eval_size_divisibility=0 .* Swin backbone does not accept"):
    validate(c, num_devices=8, num_processes=1)
  c.data.eval_buckets = False  # one canvas (data.eval_size): the divisibility is not used
  validate(c, num_devices=8, num_processes=1)


@pytest.fixture(scope="module")
def tiny(root):
  """The runlocal model ("+6 Enc": attention sees padding), random weights, thresholds lowered so that
  segments exist; a 2-device mesh; its eval step compiled once per canvas, fast."""
  c = cfg(root)
  c.eval.object_mask_threshold, c.eval.overlap_threshold = 0.0, 0.0
  c.evals.val.image_summaries = 0
  model = build_model(c.model)
  mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:2])
  x = np.zeros((1, 32, 32, 3), np.float32)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False)).lower(x).compile(
      FAST_COMPILE)(x)
  state = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
  state = jax.device_put(state, replicated)
  jitted = train_step_lib.make_eval_step(c, model, mesh, shardings=replicated)
  compiled = {}

  def eval_step(state, batch):
    key = batch["image"].shape
    if key not in compiled:
      compiled[key] = jitted.lower(state, batch).compile(FAST_COMPILE)
    return compiled[key](state, batch)

  return c, mesh, state, eval_step, compiled


def test_bucketed_evaluation_equals_each_image_alone(tiny, monkeypatch):
  """The evaluator over the mixed split (three canvases, batches with padding examples) gives, image by
  image and in PQ, what running each image alone, with only padding examples beside it, on the canvas of
  its test size gives."""
  c, mesh, state, eval_step, compiled = tiny
  src = pipeline.make_source(c, "val2017")
  seen = {}
  add = PQAccumulator.add

  def spy(acc, pred_map, pred_info, gt_map, gt_info):
    seen[len(seen)] = (pred_map, pred_info)
    return add(acc, pred_map, pred_info, gt_map, gt_info)

  monkeypatch.setattr(PQAccumulator, "add", spy)
  row, _ = panoptic.run(c, c.evals.val, state, mesh, eval_step, source=src)
  monkeypatch.undo()
  assert row["num_images"] == len(SIZES) and sorted(compiled) == [(4, 32, 32, 3), (4, 32, 64, 3),
                                                                   (4, 64, 32, 3)]
  order = [i for _, idx in pipeline.eval_plan(c, src) for i in idx]  # the order images were consumed
  acc = PQAccumulator(src.categories)
  fill = transforms.padding_example((8, 8), c.data.max_instances, c.model.num_classes)
  for k, index in enumerate(order):
    ex = src[index]
    one, _ = transforms.eval_example(ex, canvas=CANVASES[index], min_size=32, max_size=64,
                                     max_instances=c.data.max_instances, num_classes=c.model.num_classes)
    pad = transforms.padding_example(CANVASES[index], c.data.max_instances, c.model.num_classes)
    batch = {key: np.stack([one[key]] + [pad[key]] * 3) for key in fill}
    out = jax.device_get(eval_step(state, train_step_lib.shard_batch(batch, mesh)))
    (result, *rest) = inference.postprocess_to_original(
        out, batch, categories=src.categories, task="panoptic", padded_size=CANVASES[index],
        object_mask_threshold=0.0, overlap_threshold=0.0)
    assert rest == [None] * 3
    np.testing.assert_array_equal(seen[k][0], result[0], err_msg=f"image {ex['image_id']}")
    assert seen[k][1] == result[1]
    gt_map, gt_info = src.ground_truth(ex["image_id"])
    acc.add(*result, gt_map, panoptic.original_category_ids(gt_info, src.categories))
  assert sum(len(info) for _, info in seen.values()) >= 5  # segments were predicted
  want = panoptic.metric_row(acc.result())
  assert row["pq"] == pytest.approx(want["pq"], abs=1e-9) and row["pq_th"] == pytest.approx(want["pq_th"],
                                                                                          abs=1e-9)


def test_predict_batches_by_canvas_and_keeps_the_input_order(tiny, tmp_path, root, monkeypatch):
  from maskformer_jax import prediction
  c, mesh, state, eval_step, compiled = tiny
  paths = [str(p) for p in sorted((root / "val2017").iterdir())]
  shapes = []

  def step(state, batch):
    shapes.append(batch["image"].shape)
    return eval_step(state, batch)

  src = pipeline.make_source(c, "val2017")
  monkeypatch.setattr(train_step_lib, "make_eval_step", lambda *a, **k: step)
  result = prediction.predict(c, state, None, mesh, paths, str(tmp_path), src.categories)
  assert [a["image_file"] for a in result["annotations"]] == [pathlib.Path(p).name for p in paths]
  assert shapes == [(4, 32, 32, 3), (4, 32, 64, 3), (4, 64, 32, 3)]  # 2 + 4 + 3 images


def test_divisibility_zero_runs_each_image_at_exactly_its_test_size(tiny):
  """The original's COCO panoptic inference (SIZE_DIVISIBILITY 0): a ResNet model at sizes off the 32
  grid, post-processed from the exact input size; one compilation per distinct size."""
  c, mesh, state, eval_step, compiled = tiny
  c = c.copy_and_resolve_references()
  c.data.eval_size_divisibility = 0
  src = pipeline.make_source(c, "val2017")
  exact = sorted({transforms.shortest_edge_size(h, w, 32, 64) for h, w in SIZES})
  assert [canvas for canvas, _ in pipeline.eval_plan(c, src)] == exact
  row, _ = panoptic.run(c, c.evals.val, state, mesh, eval_step, source=src)
  assert row["num_images"] == len(SIZES)
  assert {(4, *canvas, 3) for canvas in exact} <= set(compiled)
