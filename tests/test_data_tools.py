"""The dataset checker and the synthetic-data CLI."""
import io
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from maskformer_jax.config import base_config
from maskformer_jax.data import check, synthetic
from maskformer_jax.data.coco_panoptic import id_to_rgb
from test_data import _jpeg, _png, hand_made, write_coco


def test_check_reports_every_problem(tmp_path):
  image, ids, info = hand_made()
  good = {"image": _jpeg(image), "png": _png(id_to_rgb(ids)), "segments_info": info}
  extra = ids.copy()
  extra[0, 0] = 999
  jpeg = _jpeg(image)
  entries = [
      dict(good, id=1),
      dict(good, id=2, image=None),  # missing image
      dict(good, id=3, image=jpeg[:len(jpeg) // 2]),  # truncated
      dict(good, id=4, png=_png(id_to_rgb(extra))),  # PNG id absent from the JSON
      dict(good, id=5, segments_info=[dict(s, category_id=77) for s in info]),  # unknown category
      dict(good, id=6, segments_info=info + [{"id": 1234, "category_id": 1, "iscrowd": 0,
                                              "area": 3}]),  # JSON segment absent from the PNG
      dict(good, id=7, png=_png(id_to_rgb(np.zeros_like(ids))), segments_info=[]),  # empty
      dict(good, id=8, image=b""),  # a zero-byte JPEG
      dict(good, id=9, png=b""),  # a zero-byte PNG
      dict(good, id=10),  # its row made malformed below
  ]
  root = write_coco(tmp_path, entries)
  ann = root / "annotations" / "panoptic_val2017.json"
  d = json.loads(ann.read_text())
  del d["annotations"][-1]["segments_info"][0]["category_id"]
  ann.write_text(json.dumps(d))
  c = base_config()
  c.data.root, c.model.num_classes, c.data.max_instances = str(root), 4, 4
  out = io.StringIO()
  counts = check.check_split(c, "val2017", out=out)
  assert counts == {"missing_file": 1, "unreadable_image": 1, "png_ids_not_in_json": 1,
                    "unknown_category": 1, "json_segment_not_in_png": 1, "no_segments": 1,
                    "more_than_max_instances": 2, "area_mismatch": 2,  # the 2 readable ones
                    "empty_file": 2, "bad_annotation": 1}
  text = out.getvalue()
  assert "10 examples" in text and "000002.jpg" in text and "000004.png" in text
  assert "000008.jpg: empty_file" in text and "000009.png: empty_file" in text
  assert f"{ann}: bad_annotation: image id 10" in text and "ERROR bad_annotation" in text


def test_check_cli_exit_status(tmp_path):
  root = synthetic.generate(tmp_path / "s", num_train=4, num_val=3, image_size=(32, 32), seed=0)
  cmd = [sys.executable, "-m", "maskformer_jax.data.check",
         "--config", "configs/coco_panoptic.py:runlocal", f"--config.data.root={root}", "--splits", "val2017"]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and "0 errors" in r.stdout and r.stdout.strip().endswith("OK"), r.stderr
  (tmp_path / "s" / "val2017" / "000000000005.jpg").write_bytes(b"garbage")
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and "unreadable_image: 1" in r.stdout and "000000000005.jpg" in r.stdout
  (tmp_path / "s" / "val2017" / "000000000005.jpg").write_bytes(b"")
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and "empty_file: 1" in r.stdout and "000000000005.jpg" in r.stdout
  ann = tmp_path / "s" / "annotations" / "panoptic_val2017.json"
  ann.write_text("{not json")  # the whole split unusable: reported, not a traceback
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and "ERROR bad_dataset" in r.stdout and str(ann) in r.stdout, r.stderr


def test_synthetic_cli(tmp_path):
  r = subprocess.run([sys.executable, "-m", "maskformer_jax.data.synthetic", "--out",
                      str(tmp_path), "--num-train", "3", "--num-val", "2", "--size", "40", "56"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert len(list((tmp_path / "train2017").iterdir())) == 3
  png = np.asarray(Image.open(tmp_path / "panoptic_val2017" / "000000000005.png"))
  assert png.shape == (40, 56, 3)


def test_check_ade20k(tmp_path):
  from test_data import write_ade
  lab = np.zeros((8, 10), np.uint8)
  lab[:4] = 5
  root = write_ade(tmp_path, [lab, np.full((8, 10), 200, np.uint8), np.zeros((8, 10), np.uint8)])
  c = base_config()
  c.data.dataset, c.data.root, c.model.num_classes = "ade20k", str(root), 150
  out = io.StringIO()
  assert check.check_split(c, "validation", out=out) == {"unknown_category": 1, "no_segments": 1}
  assert "ADE_val_00000002.png" in out.getvalue()
