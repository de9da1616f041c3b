"""COCO mask AP (evaluation/mask_ap.py, evaluation/instance.py, tools/instance_eval.py).

The reference is pycocotools itself: every expected number here is COCOeval run directly in the test on
annotations and RLEs the test builds on its own from the same masks.
"""
import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskformer_jax.evaluation import mask_ap
from maskformer_jax.tools import instance_eval

ROOT = pathlib.Path(__file__).parent.parent
CATEGORIES = [dict(id=3, name="a", isthing=1), dict(id=7, name="b", isthing=1),
              dict(id=11, name="c", isthing=1), dict(id=40, name="sky", isthing=0)]
THINGS = [c for c in CATEGORIES if c["isthing"]]


def random_image(rng, image_id):
  """A panoptic map with things of every COCO size range (some overlapping: later ones on top), a stuff
  background and sometimes a crowd; returns (id map, segments_info, the instance masks as painted)."""
  h, w = int(rng.integers(180, 260)), int(rng.integers(200, 300))
  id_map = np.full((h, w), 1000, np.int32)  # stuff
  info = [dict(id=1000, category_id=40, iscrowd=0)]
  yy, xx = np.mgrid[:h, :w]
  for k in range(int(rng.integers(3, 8))):
    side = int(rng.choice([8, 20, 45, 120]))
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    if rng.random() < 0.5:
      m = (np.abs(yy - cy) < side // 2) & (np.abs(xx - cx) < side // 2 + int(rng.integers(0, 6)))
    else:
      m = (yy - cy) ** 2 + (xx - cx) ** 2 < (side // 2) ** 2
    sid = 1 + k + 10 * image_id
    id_map[m] = sid
    info.append(dict(id=sid, category_id=int(rng.choice([3, 7, 11])), iscrowd=int(rng.random() < 0.15)))
  present = set(np.unique(id_map).tolist())
  info = [s for s in info if s["id"] in present]
  return id_map, info


def reference_gt(images, things=(3, 7, 11)):
  """COCO instance annotations built directly from the maps (the test's own encoding)."""
  anns = []
  for image_id, (id_map, info) in images.items():
    for s in info:
      if s["category_id"] not in things:
        continue
      m = id_map == s["id"]
      ys, xs = np.nonzero(m)
      rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
      anns.append(dict(id=len(anns) + 1, image_id=image_id, category_id=s["category_id"],
                       iscrowd=s["iscrowd"], area=float(m.sum()), segmentation=rle,
                       bbox=[float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]))
  return anns


def random_predictions(rng, images, things=(3, 7, 11)):
  """Per image: shifted copies of its things, some with the wrong class, random boxes, an empty mask;
  random scores rounded to 0.01 (ties included)."""
  preds, things = {}, list(things)
  for image_id, (id_map, info) in images.items():
    masks, scores, cats = [], [], []
    for s in info:
      if s["category_id"] not in things:
        continue
      m = np.roll(id_map == s["id"], (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), (0, 1))
      masks.append(m)
      scores.append(round(float(rng.random()), 2))
      cats.append(s["category_id"] if rng.random() < 0.8 else int(rng.choice(things)))
    for _ in range(int(rng.integers(1, 5))):
      m = np.zeros(id_map.shape, bool)
      y, x = rng.integers(0, id_map.shape[0] - 10), rng.integers(0, id_map.shape[1] - 10)
      m[y:y + int(rng.integers(3, 60)), x:x + int(rng.integers(3, 60))] = True
      masks.append(m)
      scores.append(round(float(rng.random()), 2))
      cats.append(int(rng.choice(things)))
    masks.append(np.zeros(id_map.shape, bool))
    scores.append(0.05)
    cats.append(things[0])
    preds[image_id] = (np.stack(masks), np.asarray(scores, np.float32), np.asarray(cats))
  return preds


def pycocotools_stats(images, anns, preds, categories=THINGS):
  """COCOeval(segm) straight from pycocotools on the test's own dicts."""
  gt = COCO()
  gt.dataset = dict(images=[dict(id=i, height=m.shape[0], width=m.shape[1]) for i, (m, _) in images.items()],
                    categories=categories, annotations=anns)
  results = []
  for image_id, (masks, scores, cats) in preds.items():
    for m, s, c in zip(masks, scores, cats):
      rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
      rle["counts"] = rle["counts"].decode()
      results.append(dict(image_id=image_id, category_id=int(c), segmentation=rle, score=float(s)))
  with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(results), "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev.stats


@pytest.fixture(scope="module")
def dataset():
  rng = np.random.default_rng(0)
  images = {i: random_image(rng, i) for i in (4, 9, 2, 17, 5)}
  return images, random_predictions(rng, images)


def accumulate(images, preds, order=None):
  acc = mask_ap.MaskAPAccumulator(CATEGORIES)
  for image_id in order or images:
    acc.add(image_id, *images[image_id], *preds[image_id])
  return acc


def test_ap_equals_pycocotools(dataset):
  images, preds = dataset
  want = pycocotools_stats(images, reference_gt(images), preds)
  assert min(want[:6]) > 0 and max(want[:6]) < 1  # every size range has ground truth and misses
  row = accumulate(images, preds).result()
  assert [row[k] for k in mask_ap.METRICS] == pytest.approx([100 * v for v in want[:6]], abs=1e-9)
  # The image order (how images spread over processes) does not matter: gathered() sorts by image id.
  other = accumulate(images, preds, order=[17, 2, 5, 9, 4]).gathered().result()
  assert other == row


def test_ground_truth_as_prediction_scores_100(dataset):
  images, _ = dataset
  preds = {}
  for image_id, (id_map, info) in images.items():
    things = [s for s in info if s["category_id"] != 40 and not s["iscrowd"]]
    preds[image_id] = (np.stack([id_map == s["id"] for s in things]), np.ones(len(things)),
                       np.array([s["category_id"] for s in things]))
  row = accumulate(images, preds).result()
  assert all(row[k] == pytest.approx(100.0, abs=1e-9) for k in mask_ap.METRICS), row
  # No detection at all: AP 0 (pycocotools' loadRes refuses an empty list; we score it).
  assert mask_ap.coco_eval_stats([dict(id=1, height=4, width=4)], THINGS,
                                 [dict(image_id=1, category_id=3, iscrowd=0, area=4.0, bbox=[0, 0, 2, 2],
                                       segmentation=mask_ap.encode(np.eye(4, dtype=bool) | np.eye(4, k=1, dtype=bool)))],
                                 [])[0] == 0.0


def test_panoptic_to_instances_hand_made():
  """10x12 map: stuff (id 5), thing 3 at rows 1-3 cols 2-6 (id 8), a crowd of 7 at rows 6-8 cols 0-3
  (id 9) partly covered by thing 11 (id 12, rows 7-9 cols 2-4), a listed segment with no pixel (id 20)."""
  id_map = np.full((10, 12), 5, np.int32)
  id_map[1:4, 2:7] = 8
  id_map[6:9, 0:4] = 9
  id_map[7:10, 2:5] = 12
  info = [dict(id=5, category_id=40), dict(id=8, category_id=3, iscrowd=0),
          dict(id=9, category_id=7, iscrowd=1), dict(id=12, category_id=11), dict(id=20, category_id=3)]
  anns = mask_ap.instances_from_panoptic(6, id_map, info, thing_ids=[3, 7, 11])
  crowd = np.zeros((10, 12), bool)
  crowd[6:9, 0:4] = True
  crowd[7:9, 2:4] = False
  want = [dict(image_id=6, category_id=3, iscrowd=0, area=15, bbox=[2, 1, 5, 3]),
          dict(image_id=6, category_id=7, iscrowd=1, area=8, bbox=[0, 6, 4, 3]),
          dict(image_id=6, category_id=11, iscrowd=0, area=9, bbox=[2, 7, 3, 3])]
  assert [{k: a[k] for k in want[0]} for a in anns] == want
  for a, m in zip(anns, (id_map == 8, crowd, id_map == 12)):
    np.testing.assert_array_equal(mask_util.decode(a["segmentation"]).astype(bool), m)
    assert mask_util.toBbox(a["segmentation"]).tolist() == a["bbox"]
    assert json.loads(json.dumps(a)) == a  # JSON-ready (RLE counts as str)


_TWO_HOSTS = """
import os, pickle, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid = int(sys.argv[1])
jax.distributed.initialize("localhost:" + sys.argv[2], num_processes=2, process_id=pid)
from maskformer_jax.evaluation import mask_ap
mask_ap._GATHER_CHUNK = 1000  # several chunks, and processes of different lengths
categories, images, preds = pickle.load(open(sys.argv[3], "rb"))
acc = mask_ap.MaskAPAccumulator(categories)
for image_id in sorted(images)[pid::2]:
  acc.add(image_id, *images[image_id], *preds[image_id])
print("RESULT", repr(acc.gathered().stats().tolist()))
"""


def test_two_processes_gather_to_the_single_process_result(dataset, tmp_path):
  """Two JAX processes (gloo) each score half the images: both get the single-process numbers."""
  import pickle
  import socket
  images, preds = dataset
  with open(tmp_path / "data.pkl", "wb") as f:
    pickle.dump((CATEGORIES, images, preds), f)
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = str(sock.getsockname()[1])
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_HOSTS, str(i), port, str(tmp_path / "data.pkl")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  want = accumulate(images, preds).stats().tolist()
  for out, err in outs:
    lines = [line for line in out.splitlines() if line.startswith("RESULT")]
    assert lines, err[-2000:]
    assert eval(lines[0][len("RESULT"):]) == want


# ------------------------------------------------------------------------------------------- in training

@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
  from maskformer_jax.data import synthetic
  return synthetic.generate(tmp_path_factory.mktemp("instance") / "data", num_train=8, num_val=4,
                            image_size=(64, 64), seed=0)


def test_training_writes_instance_ap_rows(synthetic_data, tmp_path):
  """configs/coco_panoptic.py:runlocal for 2 steps with its evaluator switched to COCO mask AP (and the
  best checkpoint chosen by it): the eval row in metrics.jsonl carries the six numbers."""
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=str(ROOT),
             XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true")
  r = subprocess.run([sys.executable, "-m", "maskformer_jax.train",
                      f"--config={ROOT}/configs/coco_panoptic.py:runlocal", f"--workdir={workdir}",
                      f"--config.data.root={synthetic_data}", "--config.total_steps=2",
                      "--config.evals.val.type=instance", "--config.evals.val.every=2",
                      "--config.evals.val.image_summaries=1", "--config.train.best_metric=val/ap",
                      "--config.train.checkpoint_every=2",
                      # Less to compile (the loop is what is tested): one decoder layer, FPN, 1 block a stage.
                      "--config.model.dec_layers=1", "--config.model.pixel_decoder=base",
                      "--config.model.resnet_blocks=1,1,1,1"],
                     env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [row for row in rows if row.get("eval") == "val"]
  assert len(evals) == 1 and evals[0]["step"] == 2 and evals[0]["num_images"] == 4
  assert (workdir / "checkpoints" / "2").is_dir()  # saved with its val/ap for the "best" choice
  for k in mask_ap.METRICS:  # 64x64 images: small objects only, so APm and APl have no ground truth
    assert k in evals[0] and (np.isnan(evals[0][k]) if k in ("apm", "apl") else 0 <= evals[0][k] <= 100)


def test_evaluator_scores_ground_truth_through_its_loop(tmp_path):
  """The evaluator's own loop (pipeline, post-processing at the original size, the id mappings) fed an
  eval step that returns the ground truth at stride 4, as test_cli's panoptic twin does: nearly every
  thing is found (one a few pixels across can vanish at stride 4), the coarse masks keep AP well below
  100. A wrong class id space would give AP 0."""
  import jax
  from _multihost_worker import ground_truth_eval_step
  from maskformer_jax import config as config_lib
  from maskformer_jax import sharding
  from maskformer_jax.data import synthetic
  from maskformer_jax.evaluation import common
  c = config_lib.load_config(f"{ROOT}/configs/coco_panoptic.py:runlocal")
  c.data.root = synthetic.generate(tmp_path / "data", num_train=2, num_val=6, image_size=(128, 128), seed=1)
  c.data.eval_size, c.data.eval_min_size, c.data.eval_max_size = (128, 128), 128, 128
  c.evals.val.type, c.evals.val.image_summaries = "instance", 2
  step = ground_truth_eval_step(c.model.num_classes)

  mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
  row, images = common.from_config(c)["val"](None, mesh, step)
  # Measured: ap 49.2, ap50 97.0, ap75 52.5, aps 48.2, apm 72.5; no large object in 128x128 images.
  assert row["num_images"] == 6 and row["ap50"] > 95.0 and 40.0 < row["ap"] < 60.0, row
  assert row["apm"] > row["aps"] > 40.0 and np.isnan(row["apl"])
  assert images.shape[0] == 2 and images.dtype == np.uint8


# -------------------------------------------------------------------------------------------------- CLI

def panoptic_files(root):
  return (f"{root}/annotations/panoptic_val2017.json", f"{root}/panoptic_val2017")


def gt_predictions(root):
  """The panoptic ground truth's non-crowd things as COCO results with score 1 (the test's encoding)."""
  from PIL import Image
  gt = json.loads(pathlib.Path(panoptic_files(root)[0]).read_text())
  things = {c["id"] for c in gt["categories"] if c["isthing"]}
  out = []
  for ann in gt["annotations"]:
    rgb = np.asarray(Image.open(f"{panoptic_files(root)[1]}/{ann['file_name']}")).astype(np.int64)
    id_map = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    for s in ann["segments_info"]:
      if s["category_id"] in things and not s["iscrowd"]:
        rle = mask_util.encode(np.asfortranarray((id_map == s["id"]).astype(np.uint8)))
        out.append(dict(image_id=ann["image_id"], category_id=s["category_id"], score=1.0,
                        segmentation=dict(size=rle["size"], counts=rle["counts"].decode())))
  return out


def test_cli_end_to_end(synthetic_data, tmp_path):
  gt_json, gt_dir = panoptic_files(synthetic_data)
  preds = gt_predictions(synthetic_data)
  (tmp_path / "pred.json").write_text(json.dumps(preds))
  r = subprocess.run([sys.executable, "-m", "maskformer_jax.tools.instance_eval",
                      f"--panoptic-gt={gt_json}", f"--panoptic-gt-dir={gt_dir}",
                      f"--pred={tmp_path / 'pred.json'}", f"--out={tmp_path / 'r.json'}"],
                     env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  row = json.loads((tmp_path / "r.json").read_text())
  assert row["ap"] == row["ap50"] == row["aps"] == pytest.approx(100.0) and row["num_images"] == 4
  assert row["num_detections"] == len(preds) and "AP50" in r.stdout

  # Instance annotations written out (the test's own), noisy predictions: the numbers are COCOeval's.
  from PIL import Image
  gt = json.loads(pathlib.Path(gt_json).read_text())
  images = {}
  for ann in gt["annotations"]:
    rgb = np.asarray(Image.open(f"{gt_dir}/{ann['file_name']}")).astype(np.int64)
    images[ann["image_id"]] = (rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2], ann["segments_info"])
  categories = [c for c in gt["categories"] if c["isthing"]]
  things = [c["id"] for c in categories]
  anns = reference_gt(images, things)
  noisy = random_predictions(np.random.default_rng(1), images, things)
  want = pycocotools_stats(images, anns, noisy, categories)
  for a in anns:
    a["segmentation"]["counts"] = a["segmentation"]["counts"].decode()
  (tmp_path / "instances.json").write_text(json.dumps(dict(
      images=gt["images"], categories=categories, annotations=anns)))
  results = [dict(image_id=i, category_id=int(c), score=float(s), segmentation=mask_ap.encode(m))
             for i, (ms, ss, cs) in noisy.items() for m, s, c in zip(ms, ss, cs)]
  (tmp_path / "noisy.json").write_text(json.dumps(results))
  row = instance_eval.main([f"--gt={tmp_path / 'instances.json'}", f"--pred={tmp_path / 'noisy.json'}"])
  got = [row[k] for k in mask_ap.METRICS]
  np.testing.assert_allclose([g for g in got if not np.isnan(g)],
                             [100 * w for w in want[:6] if w >= 0], atol=1e-9)


@pytest.mark.parametrize("corrupt, expected", [
    (lambda p: p.write_text("[{"), "pred.json: not valid JSON"),
    (lambda p: p.unlink(), "pred.json: cannot read it (FileNotFoundError"),
    (lambda p: p.write_text(json.dumps({"annotations": []})), "pred.json: expected a list"),
    (lambda p: p.write_text(json.dumps([dict(json.loads(p.read_text())[0], image_id=999)])),
     "pred.json: [0]: image_id 999 is not an image of the ground truth"),
    (lambda p: p.write_text(json.dumps([dict(json.loads(p.read_text())[0], category_id=10)])),
     "pred.json: [0]: category_id 10 is not a scored category"),  # sky: stuff
    (lambda p: p.write_text(json.dumps([{k: v for k, v in json.loads(p.read_text())[0].items()
                                         if k != "score"}])), "pred.json: [0]: missing field 'score'"),
    (lambda p: p.write_text(json.dumps([dict(json.loads(p.read_text())[0],
                                             segmentation=dict(size=[3, 3], counts="9"))])),
     "pred.json: [0]: segmentation size [3, 3] is not the image's"),
], ids=["malformed_json", "missing_file", "not_a_list", "unknown_image", "stuff_category", "missing_score",
        "wrong_size"])
def test_cli_bad_input_names_file_and_field(synthetic_data, tmp_path, capsys, corrupt, expected):
  gt_json, gt_dir = panoptic_files(synthetic_data)
  pred = tmp_path / "pred.json"
  pred.write_text(json.dumps(gt_predictions(synthetic_data)))
  corrupt(pred)
  with pytest.raises(SystemExit) as e:
    instance_eval.main([f"--panoptic-gt={gt_json}", f"--panoptic-gt-dir={gt_dir}", f"--pred={pred}"])
  assert expected in str(e.value), e.value
  assert str(e.value).startswith("instance_eval: error:")


def test_cli_bad_ground_truth(synthetic_data, tmp_path):
  gt_json, gt_dir = panoptic_files(synthetic_data)
  with pytest.raises(instance_eval.InputError, match=r"gt\.json: annotations\[0\]: missing field 'image_id'"):
    bad = tmp_path / "gt.json"
    bad.write_text(json.dumps(dict(images=[], categories=[], annotations=[{}])))
    instance_eval.instance_eval(str(tmp_path / "p.json"), gt_json=str(bad))
  with pytest.raises(instance_eval.InputError, match="missing_file"):
    instance_eval.instance_eval(str(tmp_path / "p.json"), panoptic_gt_json=gt_json,
                                panoptic_gt_dir=str(tmp_path / "nowhere"))


def test_config_accepts_instance_evaluators():
  """An instance evaluator beside PQ (configs/coco_panoptic.py has one), "best" by its AP; not on ADE20K,
  whose source has no instances."""
  from maskformer_jax import config as config_lib
  c = config_lib.load_config(f"{ROOT}/configs/coco_panoptic.py")
  assert c.evals.val_instance.type == "instance" and c.evals.val.type == "panoptic"
  c.train.best_metric = "val_instance/ap"
  config_lib.validate(c, num_devices=8, num_processes=1)
  c.train.best_metric = "val_instance/pq"
  with pytest.raises(ValueError, match="instance evaluators report ap, ap50, ap75, aps, apm, apl"):
    config_lib.validate(c, num_devices=8, num_processes=1)
  assert list(config_lib.load_config(f"{ROOT}/configs/coco_panoptic.py:runlocal").evals) == ["val"]
  ade = config_lib.load_config(f"{ROOT}/configs/ade20k.py")
  ade.evals.val.type = "instance"
  with pytest.raises(ValueError, match="type='instance' needs panoptic ground truth"):
    config_lib.validate(ade, num_devices=8, num_processes=1)
