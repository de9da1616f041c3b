"""TFDS coco/2017_panoptic source, without any download and without TensorFlow.

A tiny prepared dataset is written the way TFDS stores it (ArrayRecord shard of serialized
tf.train.Example protos, dataset_info.json, features.json) with TFDS's own TF-free serializer, and read
back through the real `open_data_source` (which, without TensorFlow, falls back from `tfds.data_source`
to the read-only builder); the `tfds.data_source` call itself is checked with a stand-in.
"""
import io

import numpy as np
import pytest
from PIL import Image

from maskformer_jax.config import base_config
from maskformer_jax.data import pipeline
from maskformer_jax.data import tfds as tfds_source
from maskformer_jax.data.coco_panoptic import BadInputError, id_to_rgb
from test_data import CONTIG, hand_made

tfds = pytest.importorskip("tensorflow_datasets")
# TFDS label = position among the 133 COCO panoptic categories; map the hand-made ids onto real ones.
LABEL = {1: 0, 3: 2, 10: 80, 20: 81}


def _enc(array, fmt):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  buf.seek(0)
  return buf


def features():
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(encoding_format="jpeg"),
      "image/filename": tfds.features.Text(),
      "image/id": np.int64,
      "panoptic_image": tfds.features.Image(encoding_format="png"),
      "panoptic_image/filename": tfds.features.Text(),
      "panoptic_objects": tfds.features.Sequence({
          "id": np.int64, "area": np.int64, "bbox": tfds.features.BBoxFeature(),
          "label": tfds.features.ClassLabel(names=[f"cat{i}" for i in range(133)]),
          "is_crowd": np.bool_}),
  })


def record(image_id, png_ids=None):
  image, ids, info = hand_made()
  return {"image": _enc(image, "PNG"), "image/filename": f"{image_id}.jpg", "image/id": image_id,
          "panoptic_image": _enc(id_to_rgb(ids if png_ids is None else png_ids), "PNG"),
          "panoptic_image/filename": f"{image_id}.png",
          "panoptic_objects": [{"id": s["id"], "area": s["area"], "label": LABEL[s["category_id"]],
                                "bbox": tfds.features.BBox(0.0, 0.0, 1.0, 1.0),
                                "is_crowd": bool(s["iscrowd"])} for s in info]}


def write_prepared(data_dir, records, split="validation"):
  from array_record.python import array_record_module
  from tensorflow_datasets.core import dataset_info, example_serializer
  from tensorflow_datasets.core import splits as splits_lib
  d = data_dir / "coco" / "2017_panoptic" / "1.1.0"
  d.mkdir(parents=True)
  f = features()
  ser = example_serializer.ExampleSerializer(f.get_serialized_info())
  w = array_record_module.ArrayRecordWriter(str(d / f"coco-{split}.array_record-00000-of-00001"),
                                            "group_size:1")
  for r in records:
    w.write(ser.serialize_example(f.encode_example(r)))
  w.close()
  info = dataset_info.DatasetInfo(
      builder=dataset_info.DatasetIdentity(name="coco", version="1.1.0", config_name="2017_panoptic",
                                           data_dir=str(d), module_name="coco"),
      features=f, split_dict=splits_lib.SplitDict([splits_lib.SplitInfo(
          name=split, shard_lengths=[len(records)], num_bytes=1, filename_template=None)]))
  info.set_file_format("array_record")
  info.write_to_directory(str(d))
  return data_dir


def test_prepared_arrayrecord_without_tensorflow(tmp_path):
  bad = hand_made()[1].copy()
  bad[0, 0] = 999  # a PNG id absent from the objects
  data_dir = write_prepared(tmp_path, [record(11), record(12, bad), record(13)])
  src = tfds_source.TfdsCocoPanopticSource("val2017", data_dir=str(data_dir))
  assert len(src) == 3 and src.split == "validation"
  assert src.categories[80] == {"id": 92, "name": "cat80", "isthing": 0, "contiguous_id": 80}
  _, ids, info = hand_made()
  ex = src[0]
  assert ex["image_id"] == 11
  got = np.where(ex["segments"] >= 0, ex["seg_labels"][np.maximum(ex["segments"], 0)], -1)
  want = np.full(ids.shape, -1)
  for s in info:
    if not s["iscrowd"]:
      want[ids == s["id"]] = LABEL[s["category_id"]]
  np.testing.assert_array_equal(got, want)
  assert src[1] == {"image_id": 12, "skip": "png_ids_not_in_json"}
  idmap, segs = src.ground_truth(13)
  np.testing.assert_array_equal(idmap, ids)
  assert [(s["id"], s["category_id"], s["iscrowd"], s["isthing"]) for s in segs] == [
      (s["id"], LABEL[s["category_id"]], s["iscrowd"], CONTIG[s["category_id"]] < 2) for s in info]
  with pytest.raises(BadInputError, match="png_ids_not_in_json"):
    tfds_source.TfdsCocoPanopticSource("val2017", data_dir=str(data_dir), bad_input="raise")[1]
  # Through make_source / make_loader: the same batch contract as the COCO files.
  c = base_config()
  c.data.dataset, c.data.root, c.data.max_instances, c.data.num_workers = (
      "tfds_coco_panoptic", str(data_dir), 8, 0)
  c.data.eval_size, c.data.eval_min_size, c.data.eval_max_size = (16, 16), 8, 16
  c.eval.batch_size = 4
  (b,) = list(pipeline.make_loader(c, "val2017", train=False, seed=0, shard_index=0, shard_count=1))
  assert b["image_id"].tolist() == [11, -1, 13, -1] and b["valid"][[0, 2]].sum(1).tolist() == [5, 5]


def test_missing_prepared_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no prepared coco/2017_panoptic"):
    tfds_source.TfdsCocoPanopticSource("val2017", data_dir=str(tmp_path))


def test_calls_tfds_data_source_without_download(monkeypatch):
  calls = []

  class FakeSource(list):
    dataset_info = None

  def fake(name, **kw):
    calls.append((name, kw))
    r = record(5)
    image, ids, _ = hand_made()
    objs = r["panoptic_objects"]
    return FakeSource([{"image": _enc(image, "PNG").getvalue(), "image/id": np.int64(5),
                        "image/filename": b"5.jpg",
                        "panoptic_image": _enc(id_to_rgb(ids), "PNG").getvalue(),
                        "panoptic_objects": {k: [o[k] for o in objs] for k in
                                             ("id", "area", "label", "is_crowd")}}])

  monkeypatch.setattr(tfds, "data_source", fake)
  src = tfds_source.TfdsCocoPanopticSource("train2017", data_dir="/somewhere")
  ((name, kw),) = calls
  assert name == "coco/2017_panoptic" and kw["split"] == "train" and kw["download"] is False
  assert kw["data_dir"] == "/somewhere" and set(kw["decoders"]) == {"image", "panoptic_image"}
  assert src[0]["image_id"] == 5 and len(src[0]["seg_labels"]) == 5


def test_bad_records_are_named_skips(caplog):
  """An empty image, a record missing a field and a record that cannot be read at all: each a counted
  skip naming the record (its file name, or its position), an error naming it under 'raise'."""
  import logging
  image, ids, _ = hand_made()
  objs = record(5)["panoptic_objects"]

  def rec(image_id, image_bytes):
    return {"image": image_bytes, "image/id": np.int64(image_id),
            "image/filename": f"{image_id}.jpg".encode(),
            "panoptic_image": _enc(id_to_rgb(ids), "PNG").getvalue(),
            "panoptic_objects": {k: [o[k] for o in objs] for k in ("id", "area", "label", "is_crowd")}}

  class Records(list):
    def __getitem__(self, i):
      if i == 3:
        raise OSError("corrupt ArrayRecord chunk")
      return list.__getitem__(self, i)

  good = _enc(image, "PNG").getvalue()
  no_objects = rec(7, good)
  del no_objects["panoptic_objects"]
  records = Records([rec(5, good), rec(6, b""), no_objects, None])
  src = tfds_source.TfdsCocoPanopticSource("val2017", data_source=records)
  assert src[0]["image_id"] == 5
  with caplog.at_level(logging.WARNING, "maskformer_jax.data"):
    assert src[1] == {"image_id": 6, "skip": "empty_file"}
    assert src[2] == {"image_id": 7, "skip": "decode_error"}
    assert src[3] == {"image_id": -1, "skip": "decode_error"}
  logged = [r.getMessage() for r in caplog.records]
  assert "validation/6.jpg: empty_file" in logged[0]
  assert "validation/7.jpg: decode_error: KeyError" in logged[1]
  assert "validation[3]: decode_error: OSError: corrupt ArrayRecord chunk" in logged[2]
  assert src.policy.counts == {"empty_file": 1, "decode_error": 2}
  strict = tfds_source.TfdsCocoPanopticSource("val2017", data_source=records, bad_input="raise")
  with pytest.raises(BadInputError, match="validation/6.jpg: empty_file"):
    strict[1]
  with pytest.raises(BadInputError, match=r"validation\[3\]: decode_error"):
    strict[3]
  assert src.ground_truth(5)[0].shape == ids.shape  # the unreadable record does not break the index
