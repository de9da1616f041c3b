"""PQ against torchmetrics' PanopticQuality and a per-segment transcription of panopticapi's algorithm on
randomised sets with void and crowd, plus hand-made cases; mIoU against torchmetrics' JaccardIndex."""
import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.detection import PanopticQuality

from maskformer_jax.evaluation import MIoUAccumulator, PQAccumulator, _from_bytes, sum_across_hosts

THINGS, STUFFS = [1, 2, 5, 7], [9, 12, 20]
CATEGORIES = [dict(id=c, isthing=1) for c in THINGS] + [dict(id=c, isthing=0) for c in STUFFS]


# ---------------------------------------------------------------------------------- the peer: panopticapi

def panopticapi_image(stats, gt_map, gt_info, pred_map, pred_info):
  """panopticapi pq_compute_single_core for one image, segment by segment with dicts (the definition)."""
  gt_segms = {s["id"]: dict(s) for s in gt_info}
  pred_segms = {s["id"]: dict(s) for s in pred_info}
  for s in gt_segms.values():
    s.setdefault("area", int((gt_map == s["id"]).sum()))
  for s in pred_segms.values():
    s["area"] = int((pred_map == s["id"]).sum())
  pairs = {}
  for g, p in zip(gt_map.reshape(-1).tolist(), pred_map.reshape(-1).tolist()):
    pairs[(g, p)] = pairs.get((g, p), 0) + 1
  gt_matched, pred_matched = set(), set()
  for (g, p), inter in pairs.items():
    if g not in gt_segms or p not in pred_segms or gt_segms[g].get("iscrowd", 0) == 1:
      continue
    if gt_segms[g]["category_id"] != pred_segms[p]["category_id"]:
      continue
    union = pred_segms[p]["area"] + gt_segms[g]["area"] - inter - pairs.get((0, p), 0)
    iou = inter / union
    if iou > 0.5:
      st = stats.setdefault(gt_segms[g]["category_id"], [0.0, 0, 0, 0])
      st[0] += iou
      st[1] += 1
      gt_matched.add(g)
      pred_matched.add(p)
  crowd = {}
  for g, s in gt_segms.items():
    if g in gt_matched:
      continue
    if s.get("iscrowd", 0) == 1:
      crowd[s["category_id"]] = g
      continue
    stats.setdefault(s["category_id"], [0.0, 0, 0, 0])[3] += 1
  for p, s in pred_segms.items():
    if p in pred_matched:
      continue
    inter = pairs.get((0, p), 0)
    if s["category_id"] in crowd:
      inter += pairs.get((crowd[s["category_id"]], p), 0)
    if inter / s["area"] > 0.5:
      continue
    stats.setdefault(s["category_id"], [0.0, 0, 0, 0])[2] += 1


def panopticapi_average(stats, categories, isthing=None):
  pq = sq = rq = 0.0
  n = 0
  per = {}
  for c in categories:
    if isthing is not None and bool(c["isthing"]) != isthing:
      continue
    iou, tp, fp, fn = stats.get(c["id"], [0.0, 0, 0, 0])
    if tp + fp + fn == 0:
      per[c["id"]] = dict(pq=0.0, sq=0.0, rq=0.0)
      continue
    n += 1
    per[c["id"]] = dict(pq=iou / (tp + 0.5 * fp + 0.5 * fn), sq=iou / tp if tp else 0.0,
                        rq=tp / (tp + 0.5 * fp + 0.5 * fn))
    pq, sq, rq = pq + per[c["id"]]["pq"], sq + per[c["id"]]["sq"], rq + per[c["id"]]["rq"]
  return dict(pq=pq / n, sq=sq / n, rq=rq / n, n=n), per


# ------------------------------------------------------------------------------------- random panoptic sets

def voronoi(rng, shape, n):
  seeds = rng.uniform(0, 1, size=(n, 2)) * shape
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
  return d.argmin(-1)


def random_pair(rng, shape=(40, 52), crowd=True, pred_void=True, json_area=False):
  """A gt panoptic map + a prediction derived from it (noisy boundaries, swaps, splits, wrong classes).

  At most one segment per stuff category on each side (torchmetrics merges stuff by category)."""
  cells = voronoi(rng, shape, 24)
  n_gt = rng.integers(3, 10)
  cell_seg = rng.integers(0, n_gt + 1, size=24)  # segment n_gt = VOID
  gt_ids = rng.choice(np.arange(1, 5000), size=n_gt, replace=False)
  gt_info, used_stuff = [], set()
  for s in range(n_gt):
    cat = int(rng.choice(THINGS + [c for c in STUFFS if c not in used_stuff]))
    used_stuff |= {cat} & set(STUFFS)
    gt_info.append(dict(id=int(gt_ids[s]), category_id=cat,
                        iscrowd=int(crowd and cat in THINGS and rng.random() < 0.25)))
  lut = np.append(gt_ids, 0)
  gt_map = lut[cell_seg[cells]]
  gt_cat = [s["category_id"] for s in gt_info]
  gt_info = [s for s in gt_info if (gt_map == s["id"]).any()]  # COCO lists only segments in the PNG
  # Prediction: per cell keep its gt segment, merge into another, or start a new one; noisy pixels.
  n_pred = n_gt + 4
  cell_pred = np.where(rng.random(24) < 0.7, np.minimum(cell_seg, n_gt - 1), rng.integers(0, n_pred, 24))
  if pred_void:
    cell_pred = np.where(rng.random(24) < 0.1, n_pred, cell_pred)
  pmap = cell_pred[cells]
  noise = rng.random(shape) < 0.08
  pmap = np.where(noise, rng.integers(0, n_pred + (1 if pred_void else 0), shape), pmap)
  pred_ids = rng.choice(np.arange(1, 5000), size=n_pred, replace=False)
  present = np.unique(pmap)
  pred_info, used_stuff = [], set()
  for s in range(n_pred):
    if s not in present:
      continue
    cat = gt_cat[s] if s < n_gt and rng.random() < 0.8 else int(rng.choice(THINGS + STUFFS))
    if cat in used_stuff:
      cat = int(rng.choice(THINGS))
    used_stuff |= {cat} & set(STUFFS)
    pred_info.append(dict(id=int(pred_ids[s]), category_id=cat))
  pred_map = np.append(pred_ids, 0)[pmap]
  if json_area:
    for s in gt_info:
      s["area"] = int((gt_map == s["id"]).sum())
  return gt_map, gt_info, pred_map, pred_info


def to_torchmetrics(id_map, info, void_cat=-1):
  cat = np.full(id_map.shape, void_cat, np.int64)
  inst = np.zeros(id_map.shape, np.int64)
  for s in info:
    cat[id_map == s["id"]] = s["category_id"]
    inst[id_map == s["id"]] = s["id"]
  return torch.from_numpy(np.stack([cat, inst], -1))


def check_against_peer(acc, stats):
  res = acc.result()
  for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
    want, per = panopticapi_average(stats, CATEGORIES, isthing)
    assert res[name]["n"] == want["n"]
    for k in ("pq", "sq", "rq"):
      assert res[name][k] == pytest.approx(want[k], abs=1e-12), (name, k)
    for c, v in per.items():
      for k in ("pq", "sq", "rq"):
        assert res["per_class"][c][k] == pytest.approx(v[k], abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pq_matches_torchmetrics_with_gt_void(seed):
  """torchmetrics equals panopticapi when predictions have no VOID and there is no crowd: it also leaves
  out of the union the gt segment's pixels predicted VOID, and ignores gt segments mostly predicted VOID."""
  rng = np.random.default_rng(seed)
  acc = PQAccumulator(CATEGORIES)
  tm = PanopticQuality(things=set(THINGS), stuffs=set(STUFFS), return_sq_and_rq=True, return_per_class=True)
  tm_avg = PanopticQuality(things=set(THINGS), stuffs=set(STUFFS), return_sq_and_rq=True)
  for _ in range(6):
    gt_map, gt_info, pred_map, pred_info = random_pair(rng, crowd=False, pred_void=False)
    acc.add(pred_map, pred_info, gt_map, gt_info)
    for m in (tm, tm_avg):
      m.update(to_torchmetrics(pred_map, pred_info)[None], to_torchmetrics(gt_map, gt_info)[None])
  want = tm.compute().numpy()  # [C, 3] per class (things sorted, then stuffs sorted): pq, sq, rq
  res = acc.result()
  order = sorted(THINGS) + sorted(STUFFS)
  for row, c in zip(want, order):
    assert [res["per_class"][c][k] for k in ("pq", "sq", "rq")] == pytest.approx(row.tolist(), abs=1e-6)
  assert int(tm.true_positives.sum()) >= 5 and int(tm.false_positives.sum()) >= 3
  assert int(tm.false_negatives.sum()) >= 3
  assert [res["All"][k] for k in ("pq", "sq", "rq")] == pytest.approx(tm_avg.compute().tolist(), abs=1e-6)


@pytest.mark.parametrize("seed", [10, 11, 12, 13])
def test_pq_matches_panopticapi_definition_with_void_and_crowd(seed):
  rng = np.random.default_rng(seed)
  acc = PQAccumulator(CATEGORIES)
  stats = {}
  for i in range(8):
    pair = random_pair(rng, crowd=True, pred_void=True, json_area=bool(i % 2))
    acc.add(pair[2], pair[3], pair[0], pair[1])
    panopticapi_image(stats, *pair)
  assert sum(s[1] for s in stats.values()) >= 5 and sum(s[2] for s in stats.values()) >= 3
  check_against_peer(acc, stats)


def test_unlisted_gt_ids_are_neither_segments_nor_void():
  """A gt PNG id missing from segments_info: panopticapi skips it in matching and, unlike VOID, it does
  not excuse a prediction from being a false positive."""
  rng = np.random.default_rng(5)
  acc, stats = PQAccumulator(CATEGORIES), {}
  for _ in range(6):
    gt_map, gt_info, pred_map, pred_info = random_pair(rng)
    listed = gt_info[1:]  # the first segment's pixels keep their id but are unlisted
    acc.add(pred_map, pred_info, gt_map, listed)
    panopticapi_image(stats, gt_map, listed, pred_map, pred_info)
  check_against_peer(acc, stats)
  gt = np.full((4, 4), 9)
  pred = np.full((4, 4), 3)
  acc = PQAccumulator(CATEGORIES)
  acc.add(pred, [dict(id=3, category_id=1)], gt, [])
  assert acc.state()[2].sum() == 1  # a FP: id 9 is not VOID


def test_state_merge_equals_single_pass():
  rng = np.random.default_rng(3)
  pairs = [random_pair(rng) for _ in range(6)]
  whole, parts = PQAccumulator(CATEGORIES), [PQAccumulator(CATEGORIES) for _ in range(3)]
  for i, (g, gi, p, pi) in enumerate(pairs):
    whole.add(p, pi, g, gi)
    parts[i % 3].add(p, pi, g, gi)
  merged = PQAccumulator(CATEGORIES)
  merged.merge(np.stack([a.state() for a in parts]))  # as process_allgather would stack hosts
  np.testing.assert_array_equal(merged.state()[1:], whole.state()[1:])  # counts exact
  np.testing.assert_allclose(merged.state()[0], whole.state()[0], rtol=1e-12)  # IoU sums up to order
  assert merged.result()["All"]["pq"] == pytest.approx(whole.result()["All"]["pq"], rel=1e-12)
  assert whole.state()[1].sum() > 0


def test_sum_across_hosts_is_bit_exact():
  state = np.array([[0.1 + 1e-12, 3.0], [2.0**40 + 1, 7.0]])
  np.testing.assert_array_equal(sum_across_hosts(state), state)  # one process here
  # The multi-process path's byte round trip: two "hosts" stacked as process_allgather returns them.
  raw = np.stack([np.frombuffer(state.tobytes(), np.uint8)] * 2)
  summed = _from_bytes(raw, state.dtype, state.shape).sum(0)
  np.testing.assert_array_equal(summed, 2 * state)
  conf = np.arange(6, dtype=np.int64).reshape(2, 3) + 2**40
  raw = np.stack([np.frombuffer(conf.tobytes(), np.uint8)])
  np.testing.assert_array_equal(_from_bytes(raw, conf.dtype, conf.shape)[0], conf)


_TWO_HOSTS = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
import jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid = int(sys.argv[1])
jax.distributed.initialize("localhost:" + sys.argv[2], num_processes=2, process_id=pid)
from maskformer_jax.evaluation import PQAccumulator, sum_across_hosts
acc = PQAccumulator([dict(id=1, isthing=1)])
acc.add(np.full((4, 4), 5), [dict(id=5, category_id=1)], np.full((4, 4), 2 + pid),
        [dict(id=2 + pid, category_id=1, area=16 + 4 * pid)])  # IoU 1 on host 0, 0.8 on host 1
total = PQAccumulator([dict(id=1, isthing=1)])
total.merge(sum_across_hosts(acc.state()))
print("RESULT", repr(total.state().tolist()))
"""


def test_sum_across_two_processes():
  """Two JAX processes (gloo CPU collectives) each add one image; both see the float64 sum."""
  import socket
  import subprocess
  import sys
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = str(sock.getsockname()[1])
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_HOSTS, str(i), port], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True) for i in range(2)]
  outs = [p.communicate(timeout=120)[0] for p in procs]
  want = [[1.0 + 16 / 20], [2.0], [0.0], [0.0]]
  for out in outs:
    line = [l for l in out.splitlines() if l.startswith("RESULT")][0]
    assert eval(line[len("RESULT"):]) == want


def test_crowd_and_void_rules_hand_made():
  """10x10 image. gt: thing A (id 1, rows 0-3), crowd of A (id 2, rows 4-6), VOID rows 7-9."""
  gt = np.zeros((10, 10), np.int64)
  gt[0:4] = 1
  gt[4:7] = 2
  gt_info = [dict(id=1, category_id=1, iscrowd=0), dict(id=2, category_id=1, iscrowd=1)]
  pred = np.zeros((10, 10), np.int64)
  pred[0:4, :8] = 11   # A: 32 px on the gt segment
  pred[7:8] = 11       # + 10 px on VOID: IoU = 32 / (42 + 40 - 32 - 10) = 0.8
  pred[4:7, :6] = 12   # A on the crowd of A: 18 px, all on crowd -> not a FP
  pred[4:7, 6:] = 13   # category 2 on the crowd of A: 12 px -> a FP (crowd counts for its own class)
  pred[8:10, :3] = 14  # category 5 on VOID: ignored
  pred[8:10, 3:5] = 15  # category 9 (stuff) with 4 px on VOID + 4 on the thing -> 0.5, not > 0.5: FP
  pred[3, 8:] = 15
  pred[0, 8:] = 15
  info = [dict(id=i, category_id=c) for i, c in ((11, 1), (12, 1), (13, 2), (14, 5), (15, 9))]
  acc = PQAccumulator(CATEGORIES)
  acc.add(pred, info, gt, gt_info)
  iou, tp, fp, fn = acc.state()
  col = {c["id"]: i for i, c in enumerate(CATEGORIES)}
  assert tp[col[1]] == 1 and iou[col[1]] == pytest.approx(32 / (42 + 40 - 32 - 10))
  assert fp[col[1]] == 0 and fn[col[1]] == 0
  assert fp[col[2]] == 1 and fp[col[5]] == 0 and fp[col[9]] == 1
  stats = {}
  panopticapi_image(stats, gt, gt_info, pred, info)
  check_against_peer(acc, stats)
  res = acc.result()
  assert res["Things"]["n"] == 2 and res["Stuff"]["n"] == 1
  assert res["per_class"][2] == dict(pq=0.0, sq=0.0, rq=0.0)
  # panopticapi takes a gt segment's area from its JSON entry when present, not from the PNG.
  acc = PQAccumulator(CATEGORIES)
  acc.add(pred, info, gt, [dict(gt_info[0], area=50), gt_info[1]])
  assert acc.state()[0, col[1]] == pytest.approx(32 / (42 + 50 - 32 - 10))


def test_prediction_errors_like_panopticapi():
  gt = np.ones((4, 4), np.int64)
  gt_info = [dict(id=1, category_id=1)]
  acc = PQAccumulator(CATEGORIES)
  with pytest.raises(KeyError):  # id in PNG, not in JSON
    acc.add(np.full((4, 4), 3), [dict(id=4, category_id=1)], gt, gt_info)
  with pytest.raises(KeyError):  # unknown category
    acc.add(np.full((4, 4), 3), [dict(id=3, category_id=99)], gt, gt_info)
  with pytest.raises(KeyError):  # listed segment with no pixel
    acc.add(np.full((4, 4), 3), [dict(id=3, category_id=1), dict(id=5, category_id=1)], gt, gt_info)


# ------------------------------------------------------------------------------------------------------ mIoU

def test_miou_matches_torchmetrics_jaccard():
  rng = np.random.default_rng(0)
  k = 6
  acc = MIoUAccumulator(k)
  tm = MulticlassJaccardIndex(num_classes=k, ignore_index=255, average="none")
  for _ in range(4):
    gt = rng.integers(0, k, size=(30, 40))
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = np.where(rng.random(gt.shape) < 0.6, np.minimum(gt, k - 1), rng.integers(0, k, gt.shape))
    acc.add(pred, gt)
    tm.update(torch.from_numpy(pred), torch.from_numpy(gt))
  res = acc.result()
  want = tm.compute().numpy()
  np.testing.assert_allclose(res["per_class_iou"], want, atol=1e-6)
  assert res["miou"] == pytest.approx(want.mean(), abs=1e-6)
  assert 0.5 < res["pixel_acc"] < 1


def test_miou_detectron2_rules_hand_made():
  """Class 2 is only predicted: detectron2 leaves it out of the mean (torchmetrics counts it as 0)."""
  gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
  pred = np.array([[0, 0, 1, 2], [0, 2, 1, 2]])
  acc = MIoUAccumulator(3)
  acc.add(pred, gt)
  res = acc.result()
  np.testing.assert_allclose(res["per_class_iou"][:2], [3 / 4, 2 / 3])
  assert np.isnan(res["per_class_iou"][2])
  assert res["miou"] == pytest.approx((3 / 4 + 2 / 3) / 2)
  assert res["pixel_acc"] == pytest.approx(5 / 7)
  other = MIoUAccumulator(3)
  other.merge(acc.state()[None])
  assert other.result()["miou"] == res["miou"]
