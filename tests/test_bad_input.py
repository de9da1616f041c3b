"""Bad input, whatever raises: empty and truncated files, a decoder's own error type (cv2.error in
OpenCV 5), malformed annotation rows. Under data.bad_input=skip each is a counted, logged skip naming
the file; under raise an error naming the file and the problem. The same in data.check, predict and
tools.pq_compute."""
import io
import json
import logging
import pickle

import cv2
import numpy as np
import pytest

from maskformer_jax.config import base_config
from maskformer_jax.data import check, pipeline
from maskformer_jax.data import coco_panoptic
from maskformer_jax.data.ade20k import Ade20kSource
from maskformer_jax.data.coco_panoptic import BadInputError, CocoPanopticSource, decode_rgb, id_to_rgb
from test_data import _jpeg, _png, hand_made, write_ade, write_coco


def raising(err):
  """A stand-in for a library function that raises `err` whatever it is called with."""
  def fn(*args, **kwargs):
    raise err
  return fn


def good_entry():
  image, ids, info = hand_made()
  return {"image": _jpeg(image), "png": _png(id_to_rgb(ids)), "segments_info": info}


def edit_json(root, fn, split="val2017"):
  path = root / "annotations" / f"panoptic_{split}.json"
  d = json.loads(path.read_text())
  fn(d)
  path.write_text(json.dumps(d))
  return path


def skipped(src, index, caplog):
  """src[index] under 'skip': (skip marker, the logged messages)."""
  caplog.clear()
  with caplog.at_level(logging.WARNING, "maskformer_jax.data"):
    rec = src[index]
  return rec, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("case,name,kind", [
    ("empty_jpeg", "000002.jpg", "empty_file"),
    ("empty_png", "000002.png", "empty_file"),
    ("truncated_png", "000002.png", "unreadable_image"),
])
def test_empty_and_truncated_files_skipped_and_named(tmp_path, caplog, case, name, kind):
  good = good_entry()
  bad = {"empty_jpeg": dict(good, image=b""), "empty_png": dict(good, png=b""),
         "truncated_png": dict(good, png=good["png"][:len(good["png"]) // 2])}[case]
  root = write_coco(tmp_path, [dict(good, id=1), dict(bad, id=2), dict(good, id=3)])
  src = CocoPanopticSource(root, "val2017", bad_input="skip")
  rec, logged = skipped(src, 1, caplog)
  assert rec == {"image_id": 2, "skip": kind} and src.policy.counts == {kind: 1}
  assert any(name in m and kind in m for m in logged), logged
  assert "skip" not in src[0] and "skip" not in src[2]
  with pytest.raises(BadInputError, match=f"{name}: {kind}") as e:
    CocoPanopticSource(root, "val2017", bad_input="raise")[1]
  assert e.value.kind == kind and e.value.path.endswith(name)
  if name.endswith(".png"):  # evaluation reads the PNG again
    with pytest.raises(BadInputError, match=f"{name}: {kind}"):
      src.ground_truth(2)


def test_cv2_error_falls_back_to_pil_and_is_a_named_skip(tmp_path, caplog, monkeypatch):
  """OpenCV 5 raises cv2.error where 4.x returned None: PIL still decodes a good file, and a file PIL
  rejects too is a skip naming it (the OpenCV message kept), never an escaped cv2.error."""
  good = good_entry()
  root = write_coco(tmp_path, [dict(good, id=1), dict(good, id=2, image=b"\x00garbage" * 20)])

  def imdecode(buf, flags):
    raise cv2.error("OpenCV(5.0.0) loadsave.cpp: error: (-215:Assertion failed) in function 'imdecode_'")

  monkeypatch.setattr(cv2, "imdecode", imdecode)
  src = CocoPanopticSource(root, "val2017", bad_input="skip")
  np.testing.assert_array_equal(src[0]["image"], _pil_decoded(good["image"]))
  rec, logged = skipped(src, 1, caplog)
  assert rec == {"image_id": 2, "skip": "unreadable_image"}
  assert any("000002.jpg" in m and "cv2.error" in m for m in logged), logged
  with pytest.raises(BadInputError, match="000002.jpg: unreadable_image"):
    CocoPanopticSource(root, "val2017", bad_input="raise")[1]
  # Any exception type from the decoder path is bad input naming the path.
  monkeypatch.setattr(cv2, "imdecode", raising(RuntimeError("boom")))
  with pytest.raises(BadInputError, match="x.jpg: unreadable_image"):
    decode_rgb(b"\x00not an image", "x.jpg")


def _pil_decoded(data):
  from PIL import Image
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_any_exception_while_decoding_is_a_named_skip(tmp_path, caplog, monkeypatch):
  """An exception of no known type anywhere in reading one example: a decode_error naming both files;
  KeyboardInterrupt still stops the run."""
  good = good_entry()
  root = write_coco(tmp_path, [dict(good, id=1), dict(good, id=2)])
  src = CocoPanopticSource(root, "val2017", bad_input="skip")
  real, calls = coco_panoptic.rgb_to_id, []

  def flaky(rgb):  # one call per example: the second example fails
    calls.append(1)
    if len(calls) == 2:
      raise RuntimeError("zlib: invalid distance")
    return real(rgb)

  monkeypatch.setattr(coco_panoptic, "rgb_to_id", flaky)
  assert "skip" not in src[0]
  rec, logged = skipped(src, 1, caplog)
  assert rec == {"image_id": 2, "skip": "decode_error"}
  assert any("000002.jpg" in m and "000002.png" in m and "RuntimeError: zlib" in m for m in logged)

  monkeypatch.setattr(coco_panoptic, "rgb_to_id", raising(KeyboardInterrupt()))
  with pytest.raises(KeyboardInterrupt):
    src[0]
  monkeypatch.setattr(coco_panoptic, "rgb_to_id", raising(MemoryError()))
  with pytest.raises(BadInputError, match="000001.jpg: decode_error: MemoryError") as e:
    CocoPanopticSource(root, "val2017", bad_input="raise")[0]
  assert isinstance(e.value.__cause__, MemoryError)


def test_bad_input_error_pickles():
  """Raised in a loader worker process, re-raised in the main one."""
  e = pickle.loads(pickle.dumps(BadInputError("empty_file", "/d/x.jpg", "the file is empty")))
  assert (e.kind, e.path, str(e)) == ("empty_file", "/d/x.jpg", "/d/x.jpg: empty_file: the file is empty")


MALFORMED = {
    "segment_without_id": lambda d: d["annotations"][1]["segments_info"][2].pop("id"),
    "segment_without_category": lambda d: d["annotations"][1]["segments_info"][0].pop("category_id"),
    "segment_not_an_object": lambda d: d["annotations"][1]["segments_info"].__setitem__(0, 5),
    "string_segment_id": lambda d: d["annotations"][1]["segments_info"][0].__setitem__("id", "a"),
    "row_without_file_name": lambda d: d["annotations"][1].pop("file_name"),
    "row_without_segments_info": lambda d: d["annotations"][1].pop("segments_info"),
    "image_without_file_name": lambda d: d["images"][1].pop("file_name"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_annotation_row_is_a_per_example_skip(tmp_path, caplog, case):
  good = good_entry()
  root = write_coco(tmp_path, [dict(good, id=1), dict(good, id=2), dict(good, id=3)])
  ann = edit_json(root, MALFORMED[case])
  src = CocoPanopticSource(root, "val2017", bad_input="skip")  # the constructor does not crash
  assert len(src) == 3 and "skip" not in src[0] and "skip" not in src[2]
  rec, logged = skipped(src, 1, caplog)
  assert rec == {"image_id": 2, "skip": "bad_annotation"}
  assert src.policy.counts == {"bad_annotation": 1}
  assert any(str(ann) in m and "image id 2" in m for m in logged), logged
  with pytest.raises(BadInputError, match="bad_annotation: image id 2") as e:
    CocoPanopticSource(root, "val2017", bad_input="raise")[1]
  assert e.value.path == str(ann)
  with pytest.raises(BadInputError, match="image id 2"):
    src.ground_truth(2)


def test_rows_without_an_id_are_reported_not_fatal(tmp_path, caplog):
  """An images entry without an id is left out, an annotation row without image_id leaves its image
  without annotation: both logged naming the JSON, the rest of the split loads."""
  good = good_entry()
  root = write_coco(tmp_path, [dict(good, id=1), dict(good, id=2), dict(good, id=3)])

  def edit(d):
    d["images"][0].pop("id")
    d["annotations"][1].pop("image_id")

  edit_json(root, edit)
  with caplog.at_level(logging.WARNING, "maskformer_jax.data"):
    src = CocoPanopticSource(root, "val2017", bad_input="skip")
  assert src.image_ids.tolist() == [2, 3] and len(src.annotation_problems) == 2
  assert src[0] == {"image_id": 2, "skip": "missing_annotation"} and "skip" not in src[1]
  assert sum("images[0] lacks 'id'" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("text,match", [
    ("{not json", "not a readable annotation JSON"),
    (json.dumps({"images": [], "annotations": []}), "no list 'categories'"),
    (json.dumps([1, 2]), "no list 'images'"),
    (json.dumps({"images": [], "annotations": [], "categories": [{"name": "x"}]}),
     r"categories\[0\] lacks 'id'"),
])
def test_unusable_annotation_json_is_a_dataset_error(tmp_path, text, match):
  root = write_coco(tmp_path, [dict(good_entry(), id=1)])
  path = root / "annotations" / "panoptic_val2017.json"
  path.write_text(text)
  with pytest.raises(ValueError, match=match) as e:
    CocoPanopticSource(root, "val2017", bad_input="skip")
  assert str(path) in str(e.value) and not isinstance(e.value, BadInputError)


SIX_KINDS = {  # image id -> kind: the six kinds of bad example plus malformed rows, in one split
    2: "empty_file", 3: "missing_file", 4: "unreadable_image", 5: "size_mismatch",
    6: "png_ids_not_in_json", 7: "unknown_category", 8: "bad_annotation", 9: "bad_annotation",
    10: "bad_annotation", 11: "bad_annotation"}
GOOD_IDS = [1, 12, 13, 14]


def six_kinds_root(root):
  good = good_entry()
  image, ids, info = hand_made()
  extra = ids.copy()
  extra[0, 0] = 999
  png = good["png"]
  entries = [dict(good, id=1),
             dict(good, id=2, image=b""),  # empty JPEG
             dict(good, id=3, png=None),  # missing PNG
             dict(good, id=4, png=png[:len(png) // 2]),  # truncated PNG
             dict(good, id=5, png=_png(id_to_rgb(ids[:6]))),  # wrong-size PNG
             dict(good, id=6, png=_png(id_to_rgb(extra))),  # PNG id absent from the JSON
             dict(good, id=7, segments_info=[dict(s, category_id=77) for s in info])]  # unknown category
  entries += [dict(good, id=i) for i in (8, 9, 10, 11, 12, 13, 14)]
  write_coco(root, entries)

  def edit(d):
    anns = {a["image_id"]: a for a in d["annotations"]}
    anns[8]["segments_info"][0].pop("id")
    anns[9]["segments_info"][1].pop("category_id")
    anns[10].pop("file_name")
    next(im for im in d["images"] if im["id"] == 11).pop("file_name")

  return edit_json(root, edit)


def test_six_kinds_train_skips_counts_and_names_each(tmp_path, caplog):
  ann = six_kinds_root(tmp_path)
  c = base_config()
  c.data.root, c.model.num_classes, c.data.max_instances, c.data.num_workers = str(tmp_path), 4, 8, 0
  c.data.image_size = c.data.eval_size = (16, 16)
  c.data.eval_min_size = c.data.eval_max_size = 16
  c.batch_size, c.eval.batch_size = 2, 4
  src = pipeline.make_source(c, "val2017", require_segments=True)
  with caplog.at_level(logging.WARNING, "maskformer_jax.data"):
    batches = list(pipeline.make_loader(c, "val2017", train=True, seed=0, shard_index=0,
                                        shard_count=1, num_epochs=1, source=src))
  assert sorted(i for b in batches for i in b["image_id"].tolist()) == GOOD_IDS
  assert all(b["valid"].any(1).all() for b in batches)
  want = {}
  for kind in SIX_KINDS.values():
    want[kind] = want.get(kind, 0) + 1
  assert dict(src.policy.counts) == want
  logged = [r.getMessage() for r in caplog.records]
  for image_id, kind in SIX_KINDS.items():
    name = str(ann) if kind == "bad_annotation" else f"{image_id:06d}."
    tag = f"image id {image_id}" if kind == "bad_annotation" else kind
    assert any(name in m and tag in m and kind in m for m in logged), (image_id, kind)
  # Eval: every bad example is padding, the good ones evaluated.
  ids = [i for b in pipeline.make_loader(c, "val2017", train=False, seed=0, shard_index=0,
                                         shard_count=1, source=src) for i in b["image_id"].tolist()]
  assert sorted(i for i in ids if i > 0) == GOOD_IDS and len(ids) == 16


@pytest.mark.parametrize("workers", [0, 2])
def test_skips_of_every_reading_process_are_recorded_and_added_up(tmp_path, workers):
  """Grain's worker processes skip with their own copy of the policy; record_to makes their counts
  reach the main process (the model card's data.skipped_inputs), each process counting what it read."""
  six_kinds_root(tmp_path / "data")
  c = base_config()
  c.data.root, c.model.num_classes, c.data.max_instances, c.data.num_workers = str(tmp_path / "data"), 4, 8, workers
  c.data.image_size = (16, 16)
  c.batch_size = 1  # no example left out of a worker's last batch
  src = pipeline.make_source(c, "val2017", require_segments=True)
  assert coco_panoptic.recorded_skips(tmp_path / "skips") == {"total": 0, "by_kind": {}, "images": 0,
                                                              "image_ids": []}
  src.policy.record_to(tmp_path / "skips")
  batches = list(pipeline.make_loader(c, "val2017", train=True, seed=0, shard_index=0, shard_count=1,
                                      num_epochs=2, source=src))
  assert sorted(i for b in batches for i in b["image_id"].tolist()) == sorted(GOOD_IDS * 2)
  want = {}
  for kind in SIX_KINDS.values():
    want[kind] = want.get(kind, 0) + 2  # two epochs: each bad example skipped twice
  got = coco_panoptic.recorded_skips(tmp_path / "skips")
  assert got == {"total": 2 * len(SIX_KINDS), "by_kind": dict(sorted(want.items())),
                 "images": len(SIX_KINDS), "image_ids": sorted(SIX_KINDS)}
  assert len(list((tmp_path / "skips").glob("*.json"))) == max(workers, 1)
  assert pickle.loads(pickle.dumps(src.policy)).counts == {}  # a copy counts what it reads itself


def test_check_reports_each_bad_kind_with_its_file(tmp_path):
  ann = six_kinds_root(tmp_path)
  (tmp_path / "panoptic_val2017" / "000012.png").write_bytes(b"")  # an empty PNG too
  c = base_config()
  c.data.root, c.model.num_classes, c.data.max_instances = str(tmp_path), 4, 8
  out = io.StringIO()
  counts = check.check_split(c, "val2017", out=out)
  text = out.getvalue()
  assert counts["empty_file"] == 2 and counts["bad_annotation"] == 4 and counts["missing_file"] == 1
  for kind in ("unreadable_image", "size_mismatch", "png_ids_not_in_json", "unknown_category"):
    assert counts[kind] == 1, kind
  for kind in set(SIX_KINDS.values()):
    assert f"ERROR {kind}" in text
  for name in ("000002.jpg", "000003.png", "000004.png", "000005.png", "000006.png", "000007.png",
               "000012.png", "image id 8", "image id 11", str(ann)):
    assert name in text, name


def test_check_catches_any_exception_per_example(tmp_path, monkeypatch):
  root = write_coco(tmp_path, [dict(good_entry(), id=1), dict(good_entry(), id=2)])
  real = check.index_segments
  def odd(idmap, ids, path):
    if "000002" in str(path):
      raise RuntimeError("odd")
    return real(idmap, ids, path)

  monkeypatch.setattr(check, "index_segments", odd)
  c = base_config()
  c.data.root, c.model.num_classes, c.data.max_instances = str(root), 4, 8
  out = io.StringIO()
  counts = check.check_split(c, "val2017", out=out)
  assert counts["decode_error"] == 1 and "000002.jpg" in out.getvalue()
  assert "decode_error" in check.ERRORS


def test_ade20k_empty_files_and_any_decoder_error(tmp_path, caplog, monkeypatch):
  lab = np.full((8, 10), 3, np.uint8)
  root = write_ade(tmp_path, [lab, lab, lab])
  (root / "images" / "validation" / "ADE_val_00000002.jpg").write_bytes(b"")
  (root / "annotations" / "validation" / "ADE_val_00000003.png").write_bytes(b"")
  src = Ade20kSource(root, "validation", bad_input="skip")
  assert "skip" not in src[0]
  for index, name in ((1, "ADE_val_00000002.jpg"), (2, "ADE_val_00000003.png")):
    rec, logged = skipped(src, index, caplog)
    assert rec == {"image_id": index + 1, "skip": "empty_file"}
    assert any(name in m for m in logged)
    with pytest.raises(BadInputError, match=f"{name}: empty_file"):
      Ade20kSource(root, "validation", bad_input="raise")[index]
  with pytest.raises(BadInputError, match="ADE_val_00000003.png: empty_file"):
    src.ground_truth(3)
  import maskformer_jax.data.ade20k as ade
  monkeypatch.setattr(ade, "decode_labels", raising(OSError("io")))
  rec, logged = skipped(src, 0, caplog)
  assert rec == {"image_id": 1, "skip": "decode_error"}
  assert any("ADE_val_00000001.jpg" in m and "ADE_val_00000001.png" in m for m in logged)


# --- tools.pq_compute -------------------------------------------------------------------------------

def _pq_set(tmp_path, n=4, seed=0):
  from test_pq_compute import write_set
  from test_evaluation import random_pair
  rng = np.random.default_rng(seed)
  pairs = [random_pair(rng, shape=(24, 30)) for _ in range(n)]
  return pairs, write_set(str(tmp_path), pairs)


@pytest.mark.parametrize("bad", ["empty", "truncated", "missing"])
def test_pq_compute_bad_prediction_png(tmp_path, bad):
  from maskformer_jax.tools import pq_compute as tool
  from test_pq_compute import assert_same, write_set
  pairs, paths = _pq_set(tmp_path / "set")
  target = tmp_path / "set" / "pred" / "000001.png"
  data = target.read_bytes()
  if bad == "missing":
    target.unlink()
  else:
    target.write_bytes(b"" if bad == "empty" else data[:len(data) // 2])
  kind = {"empty": "empty_file", "truncated": "unreadable_image", "missing": "missing_file"}[bad]
  with pytest.raises(tool.BadPNGError, match=f"000001.png: {kind}"):
    tool.pq_compute(*paths)
  with pytest.raises(tool.BadPNGError, match=f"000001.png: {kind}"):
    tool.pq_compute(*paths, workers=2)
  # skip: exactly the result of an empty prediction for that image (its gt segments false negatives).
  gt_map, gt_info, _, _ = pairs[1]
  empty = list(pairs)
  empty[1] = (gt_map, gt_info, np.zeros_like(gt_map), [])
  want = tool.pq_compute(*write_set(str(tmp_path / "empty"), empty))
  for workers in (1, 2):
    got = tool.pq_compute(*paths, workers=workers, bad_input="skip")
    assert_same(got, want)
    ((entry),) = got["bad_input"]
    assert entry["file"] == str(target) and kind in entry["error"] and entry["image_id"] == 101
  assert want["All"]["pq"] < tool.pq_compute(*_pq_set(tmp_path / "clean")[1])["All"]["pq"]


def test_pq_compute_bad_ground_truth_and_cli(tmp_path, capsys):
  from maskformer_jax.tools import pq_compute as tool
  from test_pq_compute import assert_same, cli_args, write_set
  pairs, paths = _pq_set(tmp_path / "set")
  (tmp_path / "set" / "gt" / "000002.png").write_bytes(b"")
  bad_size = tmp_path / "set" / "pred" / "000003.png"
  from PIL import Image
  Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(bad_size)
  with pytest.raises(tool.BadPNGError, match="gt/000002.png: empty_file"):
    tool.main(cli_args(paths))
  out = str(tmp_path / "r.json")
  capsys.readouterr()
  result = tool.main(cli_args(paths, out) + ["--bad-input", "skip", "--workers", "2"])
  err = capsys.readouterr().err
  assert "gt/000002.png" in err and "pred/000003.png" in err and "size_mismatch" in err
  saved = json.load(open(out))
  assert [b["file"] for b in saved["bad_input"]] == [str(tmp_path / "set" / "gt" / "000002.png"),
                                                     str(bad_size)]
  # The gt image is left out; the wrong-size prediction is scored as empty.
  g3, i3, _, _ = pairs[3]
  want = tool.pq_compute(*write_set(str(tmp_path / "want"), [pairs[0], pairs[1],
                                                             (g3, i3, np.zeros_like(g3), [])]))
  assert_same(result, want)


# --- predict ----------------------------------------------------------------------------------------

def test_predict_skips_or_raises_on_bad_image_files(tmp_path, monkeypatch, caplog):
  """The model is a stand-in (no compile): what is tested is the reading and the policy."""
  import jax
  from maskformer_jax import prediction as predict_lib
  from maskformer_jax import sharding
  from maskformer_jax import train_step as train_step_lib
  from maskformer_jax.data.synthetic import CATEGORIES
  c = base_config()
  c.model.num_classes, c.data.max_instances, c.eval.batch_size = 5, 4, 2
  c.data.eval_size, c.data.eval_min_size, c.data.eval_max_size = (32, 32), 16, 32
  c.mesh.data, c.mesh.model = 1, 1
  mesh = sharding.make_mesh(c.mesh, devices=jax.local_devices()[:1])

  def make_eval_step(config, model, mesh, shardings=None):
    def step(state, batch):
      b, h, w = batch["image"].shape[:3]
      return {"pred_logits": np.zeros((b, 3, 6), np.float32),
              "pred_masks": np.zeros((b, 3, h // 4, w // 4), np.float32)}
    return step

  monkeypatch.setattr(train_step_lib, "make_eval_step", make_eval_step)
  cats = [dict(cat, contiguous_id=i) for i, cat in enumerate(CATEGORIES)]
  images = tmp_path / "images"
  images.mkdir()
  image, _, _ = hand_made()
  for name in ("1.jpg", "3.jpg", "4.jpg"):
    (images / name).write_bytes(_jpeg(image))
  (images / "2.jpg").write_bytes(b"")  # empty
  png = _png(image)
  (images / "5.png").write_bytes(png[:len(png) // 2])  # truncated
  paths = sorted(str(p) for p in images.iterdir())
  with caplog.at_level(logging.WARNING):
    result = predict_lib.predict(c, None, None, mesh, paths, str(tmp_path / "out"), cats)
  assert [a["image_file"] for a in result["annotations"]] == ["1.jpg", "3.jpg", "4.jpg"]
  assert [s["file"] for s in result["skipped"]] == [str(images / "2.jpg"), str(images / "5.png")]
  assert "empty_file" in result["skipped"][0]["error"]
  assert "unreadable_image" in result["skipped"][1]["error"]
  assert any("2.jpg" in r.getMessage() and "empty_file" in r.getMessage() for r in caplog.records)
  saved = json.loads((tmp_path / "out" / "predictions.json").read_text())
  assert len(saved["skipped"]) == 2 and len(saved["annotations"]) == 3
  c.data.bad_input = "raise"
  with pytest.raises(BadInputError, match="2.jpg: empty_file"):
    predict_lib.predict(c, None, None, mesh, paths, str(tmp_path / "out2"), cats)


def test_pq_compute_prediction_disagreeing_with_its_json(tmp_path):
  """A PNG id missing from segments_info: raise keeps panopticapi's KeyError, with the files noted;
  skip scores the image as an empty prediction."""
  from maskformer_jax.tools import pq_compute as tool
  from test_pq_compute import assert_same, write_set
  pairs, paths = _pq_set(tmp_path / "set")
  pred = json.load(open(paths[2]))
  victim = next(a for a in pred["annotations"] if a["image_id"] == 102)
  victim["segments_info"] = victim["segments_info"][1:]
  json.dump(pred, open(paths[2], "w"))
  with pytest.raises(KeyError) as e:
    tool.pq_compute(*paths)
  assert any("pred/000002.png" in n for n in e.value.__notes__)
  got = tool.pq_compute(*paths, bad_input="skip")
  g, i, _, _ = pairs[2]
  empty = list(pairs)
  empty[2] = (g, i, np.zeros_like(g), [])
  assert_same(got, tool.pq_compute(*write_set(str(tmp_path / "want"), empty)))
  assert "bad_prediction" in got["bad_input"][0]["error"]
