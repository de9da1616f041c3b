"""Panoptic quality exactly as the COCO panoptic API (panopticapi `pq_compute`) defines it, vectorised.

Per image, one `np.bincount` over combined (gt index, pred index) pixel codes gives the whole intersection
matrix; matching, false negatives and false positives are then array operations. The rules, as in
panopticapi's `pq_compute_single_core`:
- a pair (gt, pred) of the same category matches when IoU > 0.5, where the union leaves out the predicted
  segment's pixels on gt VOID (id 0); crowd gt segments never match and are never false negatives;
- a gt area is its JSON `area` when given (panopticapi reads it from the JSON), else counted in the PNG;
- an unmatched prediction is a false positive unless more than half of it lies on gt VOID plus the gt crowd
  segment of its own category (the LAST crowd segment of that category in segments_info, as panopticapi's
  dict keeps it);
- gt pixels whose id is not listed in segments_info are neither segments nor VOID (ignored);
- per-class PQ = sum IoU / (TP + FP/2 + FN/2); averages over the classes with TP + FP + FN > 0
  (panopticapi divides by zero when there is none; here the average is 0 with n = 0).
The running state is a float64 array [4, C] (IoU sum, TP, FP, FN; counts are exact below 2**53) so the
eval loop can sum it across hosts, e.g. `merge(process_allgather(acc.state()))`.
"""
from typing import Sequence

import numpy as np

VOID = 0


class PQAccumulator:
  """Dataset-level PQ/SQ/RQ with a things/stuff split. categories: list of {id, isthing, ...}."""

  def __init__(self, categories: Sequence[dict]):
    self.categories = list(categories)
    self.cat_ids = np.array([c["id"] for c in self.categories], np.int64)
    self.isthing = np.array([bool(c["isthing"]) for c in self.categories])
    self._order = np.argsort(self.cat_ids)
    self.stats = np.zeros((4, len(self.categories)), np.float64)

  def _cat_index(self, ids, *, strict):
    """Category id -> column; unknown ids go to the extra column C (dropped) or raise (predictions)."""
    ids = np.asarray(ids, np.int64)
    pos = np.searchsorted(self.cat_ids[self._order], ids)
    pos = np.minimum(pos, len(self.cat_ids) - 1)
    idx = self._order[pos]
    known = self.cat_ids[idx] == ids
    if strict and not known.all():
      raise KeyError(f"predicted category ids not in the categories: {sorted(set(ids[~known].tolist()))}")
    return np.where(known, idx, len(self.cat_ids))

  def add(self, pred_map, pred_segments_info, gt_map, gt_segments_info):
    """One image: id maps (int, same shape; or RGB uint8 [..., 3] encoded R + 256 G + 256^2 B)."""
    pred_map, gt_map = _as_ids(pred_map), _as_ids(gt_map)
    if pred_map.shape != gt_map.shape:
      raise ValueError(f"prediction {pred_map.shape} and ground truth {gt_map.shape} differ in shape")
    num_cats = len(self.cat_ids)
    g_ids = np.array([s["id"] for s in gt_segments_info], np.int64)
    p_ids = np.array([s["id"] for s in pred_segments_info], np.int64)
    if len(set(p_ids.tolist())) != len(p_ids) or (p_ids == VOID).any():
      raise ValueError("prediction segment ids must be unique and non-zero")
    g_cat = self._cat_index([s["category_id"] for s in gt_segments_info], strict=False)
    p_cat = self._cat_index([s["category_id"] for s in pred_segments_info], strict=True)
    g_crowd = np.array([bool(s.get("iscrowd", 0)) for s in gt_segments_info], bool)
    ng, npred = len(g_ids), len(p_ids)

    # Compact codes: 0 an id not in segments_info, 1 VOID, 2.. the listed segments (in order).
    g_code = _lookup(gt_map.reshape(-1), g_ids)
    p_code = _lookup(pred_map.reshape(-1), p_ids)
    g_code *= npred + 2
    g_code += p_code
    full = np.bincount(g_code, minlength=(ng + 2) * (npred + 2)).reshape(ng + 2, npred + 2)
    if full[:, 0].any():
      bad = np.unique(pred_map.reshape(-1)[p_code == 0])
      raise KeyError(f"segment ids in the prediction PNG but not in its segments_info: {bad[:10].tolist()}")
    # Rows: 0 VOID, 1..ng segments, ng+1 unlisted gt ids (ignored); columns: 0 VOID, 1..npred segments.
    inter = np.concatenate([full[1:], full[:1]])[:, 1:]
    p_area = inter.sum(0)[1:]
    if (p_area == 0).any():
      raise KeyError(f"segments in the prediction JSON but not in its PNG: {p_ids[p_area == 0].tolist()}")
    g_area_png = inter.sum(1)[1:ng + 1]
    g_area = np.array([s.get("area", a) for s, a in zip(gt_segments_info, g_area_png)], np.float64)
    void_p = inter[0, 1:]

    # True positives: same category, gt not crowd, IoU > 0.5 (unique on both sides for such IoU).
    i_gp = inter[1:ng + 1, 1:].astype(np.float64)
    union = p_area[None, :] + g_area[:, None] - i_gp - void_p[None, :]
    iou = np.divide(i_gp, union, out=np.zeros_like(i_gp), where=union > 0)
    match = (i_gp > 0) & (g_cat[:, None] == p_cat[None, :]) & ~g_crowd[:, None] & (iou > 0.5)
    gi, pi = np.nonzero(match)
    stats = np.zeros((4, num_cats + 1), np.float64)
    stats[0] = np.bincount(g_cat[gi], weights=iou[gi, pi], minlength=num_cats + 1)
    stats[1] = np.bincount(g_cat[gi], minlength=num_cats + 1)
    g_matched = match.any(1)
    p_matched = match.any(0)
    stats[3] = np.bincount(g_cat[~g_matched & ~g_crowd], minlength=num_cats + 1)

    # False positives: unmatched predictions not mostly on VOID + the crowd region of their category.
    crowd_of_cat = np.full(num_cats + 1, -1, np.int64)
    crowd_rows = np.nonzero(g_crowd)[0]
    crowd_of_cat[g_cat[crowd_rows]] = crowd_rows  # fancy assignment: the last one of a category wins
    crowd = crowd_of_cat[p_cat]
    on_crowd = np.where(crowd >= 0, inter[np.maximum(crowd, 0) + 1, np.arange(npred) + 1], 0)
    ignored = (void_p + on_crowd) / p_area > 0.5
    stats[2] = np.bincount(p_cat[~p_matched & ~ignored], minlength=num_cats + 1)
    self.stats += stats[:, :num_cats]

  def state(self) -> np.ndarray:
    """float64 [4, C]: IoU sum, TP, FP, FN per category (in `categories` order)."""
    return self.stats.copy()

  def merge(self, state) -> None:
    """Add other accumulators' states; any leading axes (e.g. hosts from process_allgather) are summed."""
    state = np.asarray(state, np.float64)
    self.stats += state.reshape(-1, *self.stats.shape).sum(0)

  def reset(self) -> None:
    self.stats[:] = 0

  def result(self) -> dict:
    """{'All'|'Things'|'Stuff': {pq, sq, rq, n}, 'per_class': {category_id: {pq, sq, rq}}}, fractions."""
    iou, tp, fp, fn = self.stats
    denom = tp + 0.5 * fp + 0.5 * fn
    present = denom > 0
    pq = np.divide(iou, denom, out=np.zeros_like(iou), where=present)
    sq = np.divide(iou, tp, out=np.zeros_like(iou), where=tp > 0)
    rq = np.divide(tp, denom, out=np.zeros_like(iou), where=present)
    out = {}
    for name, sel in (("All", np.ones_like(present)), ("Things", self.isthing), ("Stuff", ~self.isthing)):
      m = sel & present
      n = int(m.sum())
      out[name] = {k: float(v[m].mean()) if n else 0.0 for k, v in (("pq", pq), ("sq", sq), ("rq", rq))}
      out[name]["n"] = n
    out["per_class"] = {int(c): {"pq": float(pq[i]), "sq": float(sq[i]), "rq": float(rq[i])}
                        for i, c in enumerate(self.cat_ids)}
    return out


def _as_ids(m):
  m = np.asarray(m)
  if m.ndim == 3 and m.shape[-1] == 3 and m.dtype == np.uint8:
    return rgb2id(m)
  if not np.issubdtype(m.dtype, np.integer):
    raise TypeError(f"id maps must be integer, got {m.dtype}")
  return m


def rgb2id(rgb):
  """COCO panoptic PNG colour -> segment id (R + 256 G + 256^2 B)."""
  rgb = np.asarray(rgb).astype(np.int64)
  return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def id2rgb(ids):
  """Segment id map -> uint8 RGB for a COCO panoptic PNG."""
  ids = np.asarray(ids, np.int64)
  return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


_LUT_SIZE = 1 << 24  # every id a COCO PNG can hold
_lut = None


def _lookup(values, keys):
  """values -> codes (intp): 1 VOID, 2 + position in keys, 0 anything else.

  Ids below 2**24 go through one dense table (allocated once; the zero pages that the few ids in use
  do not touch cost nothing; reset after each call): one gather per pixel, no sort, no binary search."""
  global _lut
  keys = np.asarray(keys, np.int64)
  if (keys == VOID).any():
    raise ValueError("segment id 0 is VOID")
  big = values.size and ((values.dtype.kind == "i" and values.min() < 0) or values.max() >= _LUT_SIZE)
  if big or (keys >= _LUT_SIZE).any():
    order = np.argsort(keys)
    pos = np.minimum(np.searchsorted(keys[order], values), max(len(keys) - 1, 0))
    hit = (keys[order][pos] == values) if len(keys) else np.zeros(values.shape, bool)
    return np.where(hit, order[pos] + 2, np.where(values == VOID, 1, 0)).astype(np.intp)
  if _lut is None:
    _lut = np.zeros(_LUT_SIZE, np.intp)
  _lut[keys] = np.arange(2, len(keys) + 2)
  _lut[VOID] = 1
  try:
    return _lut[values]
  finally:
    _lut[keys] = 0
    _lut[VOID] = 0
