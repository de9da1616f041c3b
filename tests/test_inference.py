"""inference.py against Hugging Face's MaskFormer post-processing, torch's resizing and a plain transcription
of the original per-query loop (consecutive ids, python dict for the stuff memory)."""
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import MaskFormerImageProcessor
from transformers.models.maskformer.modeling_maskformer import MaskFormerForInstanceSegmentationOutput

from maskformer_jax import inference

K_THING, K_STUFF = 4, 3
K = K_THING + K_STUFF
IS_THING = np.array([True] * K_THING + [False] * K_STUFF)
CATEGORIES = [dict(id=10 + 3 * k, isthing=int(IS_THING[k]), contiguous_id=k, name=str(k)) for k in range(K)]


def random_outputs(seed, b=4, q=16, size=(24, 28), coarse=(4, 5), peak=5.0):
  """Class logits with a confident class on most queries and smooth mask logits (so segments survive)."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, q, K + 1)).astype(np.float32)
  target = rng.integers(0, K + 1, size=(b, q))
  np.put_along_axis(logits, target[..., None], peak + rng.normal(size=(b, q, 1)) * 2, axis=-1)
  # Each query mostly owns some cells of a coarse partition, plus noise, so many pass the area tests.
  owner = rng.integers(0, q, size=(b, 1) + coarse)
  low = 6 * (2 * (owner == np.arange(q)[None, :, None, None]) - 1) + 3 * rng.normal(size=(b, q) + coarse)
  low = torch.from_numpy(low.astype(np.float32))
  masks = F.interpolate(low, size=size, mode="bilinear", align_corners=False).numpy()
  return logits, masks


def original_loop(cls_logits, mask_logits, is_thing, omt, ot):
  """The original MaskFormer panoptic_inference for one image, query by query (torch)."""
  mask_cls, mask_pred = torch.from_numpy(cls_logits), torch.from_numpy(mask_logits)
  scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
  mask_pred = mask_pred.sigmoid()
  keep = labels.ne(cls_logits.shape[-1] - 1) & (scores > omt)
  cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_pred[keep]
  pan = torch.zeros(mask_pred.shape[-2:], dtype=torch.int32)
  info, cur_id = [], 0
  if cur_masks.shape[0] == 0:
    return pan.numpy(), info
  cur_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
  memory = {}
  for k in range(cur_classes.shape[0]):
    c = int(cur_classes[k])
    mask = cur_ids == k
    area, orig_area = int(mask.sum()), int((cur_masks[k] >= 0.5).sum())
    if area > 0 and orig_area > 0:
      if area / orig_area < ot:
        continue
      if not is_thing[c]:
        if c in memory:
          pan[mask] = memory[c]
          continue
        memory[c] = cur_id + 1
      cur_id += 1
      pan[mask] = cur_id
      info.append(dict(id=cur_id, category=c, isthing=bool(is_thing[c])))
  return pan.numpy(), info


def torch_to_original(mask_logits, padded, content, orig):
  """The original's order: logits -> padded size -> crop content -> original size (all bilinear)."""
  x = F.interpolate(torch.from_numpy(mask_logits)[None], size=padded, mode="bilinear", align_corners=False)
  x = x[:, :, :content[0], :content[1]]
  return F.interpolate(x, size=tuple(orig), mode="bilinear", align_corners=False)[0].numpy()


def test_resize_bilinear_matches_torch_up_and_down():
  x = np.random.default_rng(0).normal(size=(2, 3, 7, 9)).astype(np.float32)
  for size in [(28, 36), (5, 4), (13, 30)]:
    want = F.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(np.asarray(inference.resize_bilinear(x, size)), want, atol=2e-5)


@pytest.mark.parametrize("orig", [(15, 20), (50, 61), (27, 33), (9, 70)])
def test_crop_resize_matches_torch_crop_then_resize(orig):
  x = np.random.default_rng(1).normal(size=(3, 32, 40)).astype(np.float32)
  content = (27, 33)
  y, valid = inference.crop_resize(x, np.array(content), np.array(orig), (64, 96))
  want = F.interpolate(torch.from_numpy(x[:, :content[0], :content[1]])[None], size=orig, mode="bilinear",
                       align_corners=False)[0].numpy()
  np.testing.assert_allclose(np.asarray(y)[:, :orig[0], :orig[1]], want, atol=2e-5)
  assert np.asarray(valid).sum() == orig[0] * orig[1] and np.asarray(valid)[:orig[0], :orig[1]].all()


@pytest.mark.parametrize("content,orig", [((27, 33), (50, 61)), ((32, 40), (15, 20)), ((20, 40), (20, 40))])
def test_upsample_crop_resize_matches_torch(content, orig):
  x = np.random.default_rng(2).normal(size=(3, 8, 10)).astype(np.float32)
  want = torch_to_original(x, (32, 40), content, orig)
  y, valid = inference.upsample_crop_resize(x, (32, 40), np.array(content), np.array(orig), (64, 64))
  np.testing.assert_allclose(np.asarray(y)[:, :orig[0], :orig[1]], want, atol=2e-5)
  assert np.asarray(valid).sum() == orig[0] * orig[1]
  # With a nonlinearity between the two resizes (only the padded pixels read are computed).
  up = F.interpolate(torch.from_numpy(x)[None], size=(32, 40), mode="bilinear", align_corners=False)
  up = torch.sigmoid(up)[:, :, :content[0], :content[1]]
  want = F.interpolate(up, size=orig, mode="bilinear", align_corners=False)[0].numpy()
  y, _ = inference.upsample_crop_resize(x, (32, 40), np.array(content), np.array(orig), (64, 64),
                                        jax.nn.sigmoid)
  np.testing.assert_allclose(np.asarray(y)[:, :orig[0], :orig[1]], want, atol=2e-6)


@pytest.mark.parametrize("seed", range(6))
def test_composed_taps_match_torch_on_random_geometry(seed):
  """The two steps' taps composed (3 merged taps per axis when the first step upsamples, 4 otherwise)
  against torch's two resizes, for random mask, padded, content and original sizes."""
  rng = np.random.default_rng(seed)
  small = rng.integers(3, 12, size=2)
  padded = tuple(max(1, int(s * rng.choice([0.5, 1.0, 2.5, 4.0]))) for s in small)
  content = tuple(int(rng.integers(1, p + 1)) for p in padded)
  orig = tuple(int(v) for v in rng.integers(1, 60, size=2))
  x = rng.normal(size=(2, *small)).astype(np.float32)
  want = torch_to_original(x, padded, content, orig)
  y, _ = inference.upsample_crop_resize(x, padded, np.array(content), np.array(orig), (64, 64))
  np.testing.assert_allclose(np.asarray(y)[:, :orig[0], :orig[1]], want, atol=2e-5)


@pytest.mark.parametrize("omt,ot", [(0.8, 0.8), (0.3, 0.5)])
def test_panoptic_matches_original_loop(omt, ot):
  logits, masks = random_outputs(seed=int(omt * 10 + ot * 100))
  res = inference.panoptic_inference(logits, masks, is_thing=IS_THING, object_mask_threshold=omt,
                                     overlap_threshold=ot)
  res = {k: np.asarray(v) for k, v in res.items()}
  n_segments = 0
  for i in range(len(logits)):
    want, info = original_loop(logits[i], masks[i], IS_THING, omt, ot)
    # Ours numbers segments by representative query; consecutive renumbering gives the original's order.
    pan, seg = inference.to_coco_panoptic({k: v[i] for k, v in res.items()}, CATEGORIES)
    np.testing.assert_array_equal(pan, want)
    assert [(s["id"], s["category_id"], s["isthing"]) for s in seg] == [
        (s["id"], CATEGORIES[s["category"]]["id"], s["isthing"]) for s in info]
    n_segments += len(info)
  assert n_segments >= 8  # the comparison is not vacuous


def hf_ids_from_ours(res_i, logits_i, omt):
  """HF numbers segments with one running counter that is reset to a fused class's id when that class
  recurs, so a later new segment can REUSE an existing id (a quirk of HF's compute_segments). Reproduce
  that numbering from our per-query result: HF visits the kept queries in order."""
  probs = torch.from_numpy(logits_i).softmax(-1)
  scores, labels = probs.max(-1)
  memory, cur, mapping = {}, 0, {}
  for q in range(len(labels)):
    seg = int(res_i["query_segment"][q])
    if not (labels[q] != K and scores[q] > omt) or seg == 0:
      continue
    c = int(labels[q])
    if c in memory:
      cur = memory[c]
    else:
      cur += 1
    mapping[seg] = cur
    if not IS_THING[c]:
      memory[c] = cur
  return mapping


@pytest.mark.parametrize("omt,ot", [(0.8, 0.8), (0.3, 0.5)])
def test_panoptic_matches_hugging_face(omt, ot):
  logits, masks = random_outputs(seed=7 + int(ot * 10))
  res = inference.panoptic_inference(logits, masks, is_thing=IS_THING, object_mask_threshold=omt,
                                     overlap_threshold=ot, hf_compat=True)
  res = {k: np.asarray(v) for k, v in res.items()}
  out = MaskFormerForInstanceSegmentationOutput(class_queries_logits=torch.from_numpy(logits),
                                                masks_queries_logits=torch.from_numpy(masks))
  # No target_sizes: HF resizes sigmoid probabilities, the original resizes logits (tested separately).
  hf = MaskFormerImageProcessor().post_process_panoptic_segmentation(
      out, threshold=omt, mask_threshold=0.5, overlap_mask_area_threshold=ot,
      label_ids_to_fuse=set(np.nonzero(~IS_THING)[0].tolist()))
  n_segments = 0
  for i in range(len(logits)):
    hf_seg = hf[i]["segmentation"].numpy()
    res_i = {k: v[i] for k, v in res.items()}
    if not hf[i]["segments_info"]:  # HF marks a picture with no kept query -1, one with no segment 0
      assert (res_i["panoptic"] == 0).all() and set(np.unique(hf_seg)) <= {-1, 0}
      continue
    mapping = hf_ids_from_ours(res_i, logits[i], omt)
    lut = np.zeros(len(res_i["query_segment"]) + 1, np.int64)
    for ours, theirs in mapping.items():
      lut[ours] = theirs
    np.testing.assert_array_equal(lut[res_i["panoptic"]], hf_seg)
    # One HF entry per surviving query, in query order, with its class.
    surviving = [q for q in range(len(logits[i])) if res_i["query_segment"][q] > 0]
    assert [s["label_id"] for s in hf[i]["segments_info"]] == [
        int(np.argmax(logits[i, q])) for q in surviving]
    n_segments += len(set(mapping))
  assert n_segments >= 8


def test_hf_compat_flag_changes_only_the_area_rule():
  """Sanity: the two area rules agree when every kept score is ~1 (score-weighting is then a no-op)."""
  logits, masks = random_outputs(seed=3, peak=30.0)
  a = inference.panoptic_inference(logits, masks, is_thing=IS_THING, object_mask_threshold=0.5,
                                   overlap_threshold=0.6)
  b = inference.panoptic_inference(logits, masks, is_thing=IS_THING, object_mask_threshold=0.5,
                                   overlap_threshold=0.6, hf_compat=True)
  np.testing.assert_array_equal(np.asarray(a["panoptic"]), np.asarray(b["panoptic"]))
  assert (np.asarray(a["panoptic"]) > 0).mean() > 0.5


def test_no_kept_query_gives_all_void():
  logits, masks = random_outputs(seed=4, b=2)
  logits[..., K] = 50.0  # everything is no-object
  res = inference.panoptic_inference(logits, masks, is_thing=IS_THING, object_mask_threshold=0.8,
                                     overlap_threshold=0.8, out_size=(40, 44))
  assert np.asarray(res["panoptic"]).shape == (2, 40, 44)
  assert (np.asarray(res["panoptic"]) == 0).all() and (np.asarray(res["segment_class"]) == -1).all()
  pan, seg = inference.to_coco_panoptic({k: np.asarray(v)[0] for k, v in res.items()}, CATEGORIES)
  assert seg == [] and (pan == 0).all()


def test_postprocess_to_original_panoptic_matches_torch_pipeline():
  logits, masks = random_outputs(seed=5, b=3, size=(8, 10))  # padded input 32x40
  batch = dict(image_size=np.array([[32, 37], [25, 40], [30, 30]], np.int32),
               orig_size=np.array([[20, 23], [50, 80], [30, 30]], np.int32),
               image_id=np.array([1, 2, -1], np.int32))
  results = inference.postprocess_to_original(dict(pred_logits=logits, pred_masks=masks), batch,
                                              categories=CATEGORIES, object_mask_threshold=0.3,
                                              overlap_threshold=0.5)
  assert results[2] is None  # batch padding
  n = 0
  for i in range(2):
    resized = torch_to_original(masks[i], (32, 40), batch["image_size"][i], batch["orig_size"][i])
    want, info = original_loop(logits[i], resized, IS_THING, 0.3, 0.5)
    pan, seg = results[i]
    assert pan.shape == tuple(batch["orig_size"][i])
    np.testing.assert_array_equal(pan, want)
    assert [s["category_id"] for s in seg] == [CATEGORIES[s["category"]]["id"] for s in info]
    n += len(info)
  assert n >= 3


def test_postprocess_output_feeds_the_pq_accumulator():
  """The COCO-style results (consecutive ids, original category ids) evaluate as a perfect match of
  themselves, and a shifted copy scores below 1."""
  from maskformer_jax.evaluation import PQAccumulator
  logits, masks = random_outputs(seed=11, b=2, size=(8, 10))
  batch = dict(image_size=np.array([[32, 40], [28, 40]]), orig_size=np.array([[30, 36], [40, 52]]))
  results = inference.postprocess_to_original(dict(pred_logits=logits, pred_masks=masks), batch,
                                              categories=CATEGORIES, object_mask_threshold=0.3,
                                              overlap_threshold=0.5)
  same, shifted = PQAccumulator(CATEGORIES), PQAccumulator(CATEGORIES)
  for pan, seg in results:
    assert sorted(np.unique(pan[pan > 0]).tolist()) == [s["id"] for s in seg] == list(range(1, len(seg) + 1))
    same.add(pan, seg, pan, [dict(s, iscrowd=0) for s in seg])
    shifted.add(np.roll(pan, 9, axis=1), seg, pan, [dict(s, iscrowd=0) for s in seg])
  res = same.result()
  assert res["All"]["pq"] == 1.0 and res["All"]["n"] == len({s["category_id"] for _, g in results for s in g})
  assert shifted.result()["All"]["pq"] < 1.0


def test_semantic_matches_hugging_face_and_original_resolution():
  logits, masks = random_outputs(seed=6, b=2, size=(8, 10))
  out = MaskFormerForInstanceSegmentationOutput(class_queries_logits=torch.from_numpy(logits),
                                                masks_queries_logits=torch.from_numpy(masks))
  hf = MaskFormerImageProcessor().post_process_semantic_segmentation(out)
  ours = inference.semantic_inference(logits, masks)
  for i in range(2):
    np.testing.assert_array_equal(np.asarray(ours["labels"][i]), hf[i].numpy())
  # Original resolution: upsample mask logits to the padded input, score, crop + resize the scores.
  batch = dict(image_size=np.array([[32, 37], [20, 40]]), orig_size=np.array([[21, 30], [45, 70]]))
  results = inference.postprocess_to_original(dict(pred_logits=logits, pred_masks=masks), batch,
                                              categories=CATEGORIES, task="semantic")
  for i in range(2):
    up = F.interpolate(torch.from_numpy(masks[i])[None], size=(32, 40), mode="bilinear", align_corners=False)
    scores = torch.einsum("qc,qhw->chw", torch.from_numpy(logits[i]).softmax(-1)[:, :-1], up[0].sigmoid())
    h, w = batch["image_size"][i]
    scores = F.interpolate(scores[None, :, :h, :w], size=tuple(batch["orig_size"][i]), mode="bilinear",
                           align_corners=False)[0]
    np.testing.assert_array_equal(results[i], scores.argmax(0).numpy())


def test_instance_matches_hugging_face():
  logits, masks = random_outputs(seed=8, b=2, q=10)
  out = MaskFormerForInstanceSegmentationOutput(class_queries_logits=torch.from_numpy(logits),
                                                masks_queries_logits=torch.from_numpy(masks))
  # HF implements Mask2Former's instance_inference; threshold 0 keeps all non-empty masks.
  hf = MaskFormerImageProcessor().post_process_instance_segmentation(out, threshold=0.0,
                                                                     return_binary_maps=True)
  ours = {k: np.asarray(v) for k, v in inference.instance_inference(logits, masks).items()}
  for i in range(2):
    assert ours["masks"].shape[1] == 10  # top-k with k = Q
    nonempty = ours["masks"][i].any((1, 2))
    got = sorted((int(l), round(float(s), 5), m.tobytes()) for l, s, m, ne in
                 zip(ours["labels"][i], ours["scores"][i], ours["masks"][i], nonempty) if ne)
    maps = hf[i]["segmentation"].numpy().astype(bool)
    want = sorted((s["label_id"], round(s["score"], 5), maps[j].tobytes())
                  for j, s in enumerate(hf[i]["segments_info"]))
    assert [g[:2] for g in got] == [w[:2] for w in want] and [g[2] for g in got] == [w[2] for w in want]
  # Panoptic datasets: only thing classes are instances.
  things = inference.instance_inference(logits, masks, is_thing=IS_THING)
  np.testing.assert_array_equal(np.asarray(things["valid"]), IS_THING[ours["labels"]])


def test_instance_postprocess_to_original_shapes_and_ids():
  logits, masks = random_outputs(seed=9, b=2, q=6, size=(8, 8))
  batch = dict(image_size=np.array([[32, 32], [24, 32]]), orig_size=np.array([[40, 50], [12, 16]]))
  res = inference.postprocess_to_original(dict(pred_logits=logits, pred_masks=masks), batch,
                                          categories=CATEGORIES, task="instance")
  thing_ids = {c["id"] for c in CATEGORIES if c["isthing"]}
  for r, (h, w) in zip(res, batch["orig_size"]):
    assert r["masks"].shape[1:] == (h, w) and set(r["category_id"].tolist()) <= thing_ids
    assert len(r["scores"]) == len(r["masks"]) > 0


def dense_reference(cls_logits, mask_probs, omt, ot):
  """Every query's mask probabilities at full resolution and one argmax over all queries (how the panoptic
  merge was computed before the kept-query loop), then the original's per-query loop; numpy, fed JAX's
  probabilities so that the two differ only in how the work is organised. Returns (map, classes)."""
  probs = np.asarray(jax.nn.softmax(cls_logits, axis=-1))
  score, label = probs.max(-1), probs.argmax(-1)
  keep = (label != K) & (score > omt)
  ids = np.where(keep[:, None, None], score[:, None, None] * mask_probs, -np.inf).argmax(0)  # first NaN wins
  pan, memory, classes = np.zeros(ids.shape, np.int32), {}, []
  for q in np.flatnonzero(keep):
    mask, c = ids == q, int(label[q])
    area, orig_area = mask.sum(), (mask_probs[q] >= 0.5).sum()
    if area == 0 or orig_area == 0 or area / orig_area < ot:
      continue
    if not IS_THING[c] and c in memory:
      pan[mask] = memory[c]
      continue
    classes.append(c)
    pan[mask] = len(classes)
    if not IS_THING[c]:
      memory[c] = len(classes)
  return pan, classes


@pytest.mark.parametrize("case", ["some_kept", "all_kept", "none_kept", "nan_masks"])
def test_kept_query_loop_equals_one_argmax_over_all_queries(case):
  """postprocess_to_original resizes only the kept queries, one at a time, keeping a running argmax: the
  same maps and segments as resizing every query and one argmax over all of them, whether some, all or
  none of the queries pass the class test, and with NaN mask logits (as jnp.argmax: the first NaN wins)."""
  logits, masks = random_outputs(seed=21, b=3, q=12, size=(8, 10))  # padded input 32x40
  omt = 0.3
  if case == "all_kept":
    logits[..., K], omt = -50.0, 0.0
  elif case == "none_kept":
    logits[..., K] = 50.0
  elif case == "nan_masks":
    masks[:, ::3, 2:4, 3:6] = np.nan
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  kept = ((probs.argmax(-1) != K) & (probs.max(-1) > omt)).sum(1)
  assert {"all_kept": kept == 12, "none_kept": kept == 0}.get(case, (kept > 0) & (kept < 12)).all()
  batch = dict(image_size=np.array([[32, 37], [25, 40], [30, 30]]),
               orig_size=np.array([[20, 23], [50, 80], [30, 30]]))
  results = inference.postprocess_to_original(dict(pred_logits=logits, pred_masks=masks), batch,
                                              categories=CATEGORIES, object_mask_threshold=omt,
                                              overlap_threshold=0.5)
  resize = jax.jit(inference.upsample_crop_resize, static_argnums=(1, 4))
  n = 0
  for i, (pan, seg) in enumerate(results):
    (h, w), canvas = batch["orig_size"][i], inference.canvas_for(batch["orig_size"])
    resized, _ = resize(masks[i], (32, 40), batch["image_size"][i], batch["orig_size"][i], canvas)
    want, classes = dense_reference(logits[i], np.asarray(jax.nn.sigmoid(resized))[:, :h, :w], omt, 0.5)
    np.testing.assert_array_equal(pan, want)
    assert [s["category_id"] for s in seg] == [CATEGORIES[c]["id"] for c in classes]
    n += len(seg)
  assert (n == 0) == (case == "none_kept")


def test_to_original_compiles_once_for_any_number_of_kept_queries():
  """The loop's trip count is data, not shape: 0, some or all kept queries reuse one compilation."""
  logits, masks = random_outputs(seed=22, b=2, q=12, size=(8, 10))
  batch = dict(image_size=np.array([[32, 40], [28, 36]]), orig_size=np.array([[40, 50], [30, 36]]))

  def run(num_candidates):
    lg = logits.copy()
    lg[:, num_candidates:, K] = 50.0  # the rest are no-object
    return inference.postprocess_to_original(dict(pred_logits=lg, pred_masks=masks), batch,
                                             categories=CATEGORIES, object_mask_threshold=0.3,
                                             overlap_threshold=0.5)
  run(5)
  compiled = inference._to_original._cache_size()
  assert all(seg == [] for _, seg in run(0))
  run(1), run(12)
  assert inference._to_original._cache_size() == compiled
