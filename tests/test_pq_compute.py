"""The pq_compute tool on small generated COCO-format sets (PNG + JSON) against panopticapi's algorithm
(transcribed below as the peer, reading PNGs the same way), torchmetrics and hand-computed values.

`python tests/test_pq_compute.py [--images N] [--segments S]` times the tool against the peer
(docs/benchmarks.md)."""
import functools
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.detection import PanopticQuality

sys.path.insert(0, os.path.dirname(__file__))
from test_evaluation import (CATEGORIES, STUFFS, THINGS, panopticapi_average, panopticapi_image,  # noqa: E402
                             random_pair, to_torchmetrics)

from maskformer_jax.evaluation import id2rgb  # noqa: E402
from maskformer_jax.tools import pq_compute as tool  # noqa: E402


def peer_image(stats, pan_gt, gt_info, pan_pred, pred_info, categories):
  """panopticapi's pq_compute_single_core body for one image (gt areas from the JSON)."""
  offset, void = 256 * 256 * 256, 0
  gt_segms = {el["id"]: dict(el) for el in gt_info}
  pred_segms = {el["id"]: dict(el) for el in pred_info}
  labels, counts = np.unique(pan_pred, return_counts=True)
  for label, cnt in zip(labels, counts):
    if label == void:
      continue
    assert pred_segms[label]["category_id"] in categories
    pred_segms[label]["area"] = cnt
  pairs = {}
  joint = pan_gt.astype(np.uint64) * offset + pan_pred.astype(np.uint64)
  labels, counts = np.unique(joint, return_counts=True)
  for label, inter in zip(labels, counts):
    pairs[(int(label // offset), int(label % offset))] = inter
  gt_matched, pred_matched = set(), set()
  for (g, p), inter in pairs.items():
    if g not in gt_segms or p not in pred_segms or gt_segms[g]["iscrowd"] == 1:
      continue
    if gt_segms[g]["category_id"] != pred_segms[p]["category_id"]:
      continue
    iou = inter / (pred_segms[p]["area"] + gt_segms[g]["area"] - inter - pairs.get((void, p), 0))
    if iou > 0.5:
      st = stats.setdefault(gt_segms[g]["category_id"], [0.0, 0, 0, 0])
      st[0] += iou
      st[1] += 1
      gt_matched.add(g)
      pred_matched.add(p)
  crowd = {}
  for g, info in gt_segms.items():
    if g in gt_matched:
      continue
    if info["iscrowd"] == 1:
      crowd[info["category_id"]] = g
      continue
    stats.setdefault(info["category_id"], [0.0, 0, 0, 0])[3] += 1
  for p, info in pred_segms.items():
    if p in pred_matched:
      continue
    inter = pairs.get((void, p), 0)
    if info["category_id"] in crowd:
      inter += pairs.get((crowd[info["category_id"]], p), 0)
    if inter / info["area"] > 0.5:
      continue
    stats.setdefault(info["category_id"], [0.0, 0, 0, 0])[2] += 1


def peer_pq_compute(gt_json_file, gt_dir, pred_json_file, pred_dir):
  """panopticapi's pq_compute on one core: np.unique over gt * 256^3 + pred, then dict loops per pair."""
  gt, pred = json.load(open(gt_json_file)), json.load(open(pred_json_file))
  categories = {c["id"]: c for c in gt["categories"]}
  pred_by_image = {a["image_id"]: a for a in pred["annotations"]}
  stats = {}
  for gt_ann in gt["annotations"]:
    pred_ann = pred_by_image[gt_ann["image_id"]]
    def read(path):
      rgb = np.array(Image.open(path), dtype=np.uint32)
      return rgb[:, :, 0] + 256 * rgb[:, :, 1] + 256 * 256 * rgb[:, :, 2]
    pan_gt = read(os.path.join(gt_dir, gt_ann["file_name"]))
    pan_pred = read(os.path.join(pred_dir, pred_ann["file_name"]))
    peer_image(stats, pan_gt, gt_ann["segments_info"], pan_pred, pred_ann["segments_info"], categories)
  cats = list(categories.values())
  out = {name: panopticapi_average(stats, cats, isthing)[0]
         for name, isthing in (("All", None), ("Things", True), ("Stuff", False))}
  out["per_class"] = panopticapi_average(stats, cats)[1]
  return out, stats


def write_set(root, pairs, categories=CATEGORIES):
  """COCO panoptic layout: gt.json + gt/ PNGs, pred.json + pred/ PNGs (ids as R + 256 G + 256^2 B)."""
  for d in ("gt", "pred"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  gt_anns, pred_anns = [], []
  for i, (gt_map, gt_info, pred_map, pred_info) in enumerate(pairs):
    name = f"{i:06d}.png"
    Image.fromarray(id2rgb(gt_map)).save(os.path.join(root, "gt", name))
    Image.fromarray(id2rgb(pred_map)).save(os.path.join(root, "pred", name))
    gt_info = [dict(s, iscrowd=s.get("iscrowd", 0), area=int((gt_map == s["id"]).sum())) for s in gt_info]
    gt_anns.append(dict(image_id=100 + i, file_name=name, segments_info=gt_info))
    pred_anns.append(dict(image_id=100 + i, file_name=name, segments_info=pred_info))
  json.dump(dict(annotations=gt_anns, categories=categories), open(os.path.join(root, "gt.json"), "w"))
  json.dump(dict(annotations=pred_anns[::-1]), open(os.path.join(root, "pred.json"), "w"))
  return [os.path.join(root, "gt.json"), os.path.join(root, "gt"), os.path.join(root, "pred.json"),
          os.path.join(root, "pred")]


def cli_args(paths, out=None):
  args = ["--gt-json", paths[0], "--gt-dir", paths[1], "--pred-json", paths[2], "--pred-dir", paths[3]]
  return args + (["--out", out] if out else [])


def assert_same(result, want):
  for name in ("All", "Things", "Stuff"):
    assert result[name]["n"] == want[name]["n"]
    for k in ("pq", "sq", "rq"):
      assert result[name][k] == pytest.approx(want[name][k], abs=1e-12), (name, k)
  for c, v in want["per_class"].items():
    assert result["per_class"][c] == pytest.approx(v, abs=1e-12)


def test_cli_matches_panopticapi_peer_with_void_and_crowd(tmp_path):
  rng = np.random.default_rng(0)
  pairs = [random_pair(rng, shape=(36, 44)) for _ in range(10)]
  paths = write_set(str(tmp_path), pairs)
  out = str(tmp_path / "result.json")
  result = tool.main(cli_args(paths, out))
  want, stats = peer_pq_compute(*paths)
  assert sum(s[1] for s in stats.values()) >= 5  # matches happen
  assert_same(result, want)
  # ... and the pixel-by-pixel definition agrees with the peer too.
  direct = {}
  for pair in pairs:
    panopticapi_image(direct, *pair)
  assert {c: s[1:] for c, s in direct.items()} == {c: s[1:] for c, s in stats.items()}
  saved = json.load(open(out))
  assert set(saved) == {"All", "Things", "Stuff", "per_class"} and 0 <= saved["All"]["pq"] <= 1
  assert saved["per_class"][str(THINGS[0])] == pytest.approx(result["per_class"][THINGS[0]])


def test_cli_matches_torchmetrics_and_workers(tmp_path):
  rng = np.random.default_rng(1)
  pairs = [random_pair(rng, crowd=False, pred_void=False) for _ in range(6)]
  paths = write_set(str(tmp_path), pairs)
  result = tool.pq_compute(*paths)
  tm = PanopticQuality(things=set(THINGS), stuffs=set(STUFFS), return_sq_and_rq=True)
  for gt_map, gt_info, pred_map, pred_info in pairs:
    tm.update(to_torchmetrics(pred_map, pred_info)[None], to_torchmetrics(gt_map, gt_info)[None])
  assert [result["All"][k] for k in ("pq", "sq", "rq")] == pytest.approx(tm.compute().tolist(), abs=1e-6)
  two = tool.pq_compute(*paths, workers=2)
  assert two["All"]["pq"] == pytest.approx(result["All"]["pq"], rel=1e-12)
  assert two["Things"]["n"] == result["Things"]["n"]


def test_cli_hand_computed(tmp_path):
  """One image: a thing matched at IoU 0.8, a stuff class predicted wrongly (FP + FN)."""
  gt = np.zeros((10, 10), np.int64)
  gt[:5] = 7
  gt[5:] = 8
  pred = np.zeros((10, 10), np.int64)
  pred[:4] = 3      # thing 1: 40 px vs gt 50 px -> IoU 0.8
  pred[4:] = 4      # stuff 12 over gt stuff 9 -> FP for 12, FN for 9
  pairs = [(gt, [dict(id=7, category_id=1), dict(id=8, category_id=9)], pred,
            [dict(id=3, category_id=1), dict(id=4, category_id=12)])]
  result = tool.pq_compute(*write_set(str(tmp_path), pairs))
  assert result["Things"] == dict(pq=pytest.approx(0.8), sq=pytest.approx(0.8), rq=1.0, n=1)
  assert result["Stuff"] == dict(pq=0.0, sq=0.0, rq=0.0, n=2)
  assert result["All"]["pq"] == pytest.approx(0.8 / 3) and result["All"]["n"] == 3


def test_read_id_png_paths_agree(tmp_path):
  """The OpenCV path, the PIL fallback (greyscale PNG) and the encoding round trip give the same ids."""
  ids = np.random.default_rng(4).integers(0, 1 << 24, size=(7, 9))
  Image.fromarray(id2rgb(ids)).save(tmp_path / "rgb.png")
  got = tool.read_id_png(str(tmp_path / "rgb.png"))
  assert got.dtype == np.uint32
  np.testing.assert_array_equal(got, ids)
  gray = (ids % 256).astype(np.uint8)  # a greyscale PNG reads as R = G = B (OpenCV gives 2-D: PIL path)
  Image.fromarray(gray).save(tmp_path / "l.png")
  np.testing.assert_array_equal(tool.read_id_png(str(tmp_path / "l.png")), gray.astype(np.int64) * 65793)


def test_missing_prediction_raises(tmp_path):
  rng = np.random.default_rng(2)
  paths = write_set(str(tmp_path), [random_pair(rng) for _ in range(2)])
  pred = json.load(open(paths[2]))
  pred["annotations"] = pred["annotations"][:1]
  json.dump(pred, open(paths[2], "w"))
  with pytest.raises(KeyError):
    tool.pq_compute(*paths)


def test_module_entry_point(tmp_path):
  paths = write_set(str(tmp_path), [random_pair(np.random.default_rng(3))])
  out = subprocess.run([sys.executable, "-m", "maskformer_jax.tools.pq_compute"] + cli_args(paths),
                       capture_output=True, text=True, check=True)
  assert "Things" in out.stdout and "PQ" in out.stdout


def bench(n_images=100, shape=(480, 640), n_segments=40, workers=(1, 2), rounds=3):
  """Tool vs the panopticapi peer on COCO-like images (about 40 segments, 480x640)."""
  import tempfile
  rng = np.random.default_rng(0)
  pairs = []
  for _ in range(n_images):
    cells = _blocks(rng, shape, n_segments)
    gt_ids = rng.choice(np.arange(1, 1 << 24), n_segments, replace=False)
    pred_ids = rng.choice(np.arange(1, 1 << 24), n_segments, replace=False)
    gt_cat = rng.choice(THINGS + STUFFS, n_segments)
    gt_info = [dict(id=int(i), category_id=int(c), iscrowd=int(rng.random() < 0.05))
               for i, c in zip(gt_ids, gt_cat)]
    pcells = np.where(rng.random(shape) < 0.05, rng.integers(0, n_segments, shape), cells)
    pred_cat = np.where(rng.random(n_segments) < 0.8, gt_cat, rng.choice(THINGS + STUFFS, n_segments))
    present = np.unique(pcells)
    pred_info = [dict(id=int(pred_ids[s]), category_id=int(pred_cat[s])) for s in present]
    gt_map = np.where(rng.random(shape) < 0.02, 0, gt_ids[cells])
    pairs.append((gt_map, [s for s in gt_info if (gt_map == s["id"]).any()], pred_ids[pcells], pred_info))
  from maskformer_jax.evaluation import PQAccumulator
  arrays = [(g.astype(np.uint32), [dict(s, area=int((g == s["id"]).sum())) for s in gi],
             p.astype(np.uint32), pi) for g, gi, p, pi in pairs]  # gt areas in the JSON, as in COCO
  cats = {c["id"]: c for c in CATEGORIES}

  def peer_memory():
    for g, gi, p, pi in arrays:
      peer_image({}, g, gi, p, pi, cats)

  def tool_memory():
    acc = PQAccumulator(CATEGORIES)
    for g, gi, p, pi in arrays:
      acc.add(p, pi, g, gi)

  with tempfile.TemporaryDirectory() as root:
    paths = write_set(root, pairs)
    want, _ = peer_pq_compute(*paths)
    assert_same(tool.pq_compute(*paths), want)
    runs = {"in memory: panopticapi peer": peer_memory, "in memory: PQAccumulator.add": tool_memory,
            "PNG + JSON: panopticapi peer": lambda: peer_pq_compute(*paths),
            "PNG + JSON: pq_compute in-process": lambda: tool.pq_compute(*paths)}
    for w in workers:  # the CLI in a fresh interpreter (spawned workers re-import only the tool)
      runs[f"CLI, {w} worker(s), incl. interpreter start"] = functools.partial(
          subprocess.run, [sys.executable, "-m", "maskformer_jax.tools.pq_compute", "--workers", str(w)] +
          cli_args(paths), check=True, capture_output=True)
    times = {k: [] for k in runs}
    for _ in range(rounds):  # interleaved, medians: the development machine is shared
      for k, fn in runs.items():
        t = time.perf_counter()
        fn()
        times[k].append(time.perf_counter() - t)
  print(f"{n_images} images {shape}, {n_segments} segments, median of {rounds} rounds, ms/image:")
  for k, v in times.items():
    print(f"  {k}: {1e3 * np.median(v) / n_images:.1f}")


def _blocks(rng, shape, n):
  """Random segments as an irregular grid of rectangles (cheap to build at full resolution)."""
  ys = np.sort(rng.choice(np.arange(1, shape[0]), int(np.sqrt(n)) - 1, replace=False))
  xs = np.sort(rng.choice(np.arange(1, shape[1]), n // int(np.sqrt(n)) - 1, replace=False))
  r = np.searchsorted(ys, np.arange(shape[0]), side="right")
  c = np.searchsorted(xs, np.arange(shape[1]), side="right")
  return (r[:, None] * (len(xs) + 1) + c[None, :]) % n


if __name__ == "__main__":
  def arg(name, default):
    return int(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default
  bench(n_images=arg("--images", 100), n_segments=arg("--segments", 40))


def test_read_id_png_bad_files_named(tmp_path, monkeypatch):
  """Missing, empty, truncated: BadPNGError naming the file and the problem. OpenCV raising (cv2.error
  in OpenCV 5) falls back to PIL, whose verdict is final."""
  import cv2
  ids = np.random.default_rng(5).integers(0, 1 << 24, size=(7, 9))
  Image.fromarray(id2rgb(ids)).save(tmp_path / "ok.png")
  data = (tmp_path / "ok.png").read_bytes()
  (tmp_path / "empty.png").write_bytes(b"")
  (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
  for name, kind in (("missing.png", "missing_file"), ("empty.png", "empty_file"),
                     ("cut.png", "unreadable_image")):
    with pytest.raises(tool.BadPNGError, match=f"{name}: {kind}") as e:
      tool.read_id_png(str(tmp_path / name))
    assert e.value.path == str(tmp_path / name)

  def imdecode(buf, flags):
    raise cv2.error("OpenCV(5.0.0): error: (-215:Assertion failed) !buf.empty()")

  monkeypatch.setattr(cv2, "imdecode", imdecode)
  np.testing.assert_array_equal(tool.read_id_png(str(tmp_path / "ok.png")), ids)
  with pytest.raises(tool.BadPNGError, match="cut.png: unreadable_image.*cv2.error"):
    tool.read_id_png(str(tmp_path / "cut.png"))


def test_bad_input_flag_rejects_unknown_mode(tmp_path):
  paths = write_set(str(tmp_path), [random_pair(np.random.default_rng(6))])
  with pytest.raises(ValueError, match="'raise' or 'skip'"):
    tool.pq_compute(*paths, bad_input="ignore")
  assert "bad_input" not in tool.pq_compute(*paths)  # the default output is unchanged
  assert tool.pq_compute(*paths, bad_input="skip")["bad_input"] == []
