"""The evaluation-padding benchmark (maskformer_jax/bench/eval_padding.py) on a tiny random model.

Random weights give meaningless segmentations, but the thresholds are lowered so that segments exist, and
what is checked is the measurement itself: the unpadded path really runs at the resized size with the
same network, identical inputs agree exactly, and the agreement measure pairs segments as documented.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _multihost_worker import FAST_COMPILE
from maskformer_jax.bench import eval_padding as bench
from maskformer_jax.config import load_config
from maskformer_jax.data import synthetic
from maskformer_jax.data.coco_panoptic import CocoPanopticSource
from maskformer_jax.models import build_model

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def setup():
  config = load_config(f"{ROOT}/configs/coco_panoptic.py:runlocal")  # "+6 Enc": attention sees padding
  config.eval.object_mask_threshold = 0.0  # random weights score ~1/(K+1): keep all but no-object
  config.eval.overlap_threshold = 0.0
  model = build_model(config.model)
  x = jnp.zeros((1, 64, 64, 3))
  init = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False)).lower(x).compile(FAST_COMPILE)
  variables = init(x)
  return config, model, {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def source(tmp_path, size):
  root = synthetic.generate(tmp_path / f"synth_{size[0]}x{size[1]}", num_train=0, num_val=2, image_size=size)
  return CocoPanopticSource(root, "val2017")


def test_resnet_model_matches_hugging_face_off_the_32_grid():
  """The unpadded path is the original network at that size: our ResNet MaskFormer takes any size, and
  HF's, which like the original runs at any size, gives the same outputs at 40x56 (ResNet strides, FPN
  resizes, position embeddings)."""
  from test_convert import from_hf, hf_forward, images, make_hf, maxdiff
  hf = make_hf(depth=18, width=8, hidden=32, heads=2, layers=2, queries=4, labels=3)
  module, variables = from_hf(hf)
  x = images(1, 40, 56)
  out = bench.make_forward(module, FAST_COMPILE)(variables, x)
  ref = hf_forward(hf, x)
  assert out["pred_masks"].shape == tuple(ref.masks_queries_logits.shape) == (1, 4, 10, 14)
  assert maxdiff(out["pred_logits"], ref.class_queries_logits) <= 1e-4
  assert maxdiff(out["pred_masks"], ref.masks_queries_logits) <= 1e-4


def test_every_variant_agrees_when_nothing_is_padded(setup, tmp_path):
  config, model, variables = setup
  report = bench.run(config, variables, model, source(tmp_path, (64, 64)), min_size=64, max_size=64,
                     canvases=[(64, 64)],
                     compiler_options=FAST_COMPILE)
  assert report["variants"] == ["exact", "pad32", "pad32_mean", "canvas 64x64"]
  assert len(report["images"]) == 2
  for rec in report["images"]:
    assert set(rec["inputs"].values()) == {(64, 64)}
    for name, a in rec["agreement"].items():
      assert a["pixel"] == 1.0 and a["category"] == 1.0 and a["segments_a"] == a["segments_b"] > 0, name
  pqs = {name: row["pq"] for name, row in report["pq"].items()}
  assert len(set(pqs.values())) == 1, pqs
  s = report["summary"]["canvas 64x64"]
  assert s["pixel_min"] == 1.0 and s["count_differs"] == 0.0 and s["padding_median"] == 0.0
  lines = []
  bench.print_table(report, out=lines.append)
  assert len(lines) == 2 + 4 and lines[2].startswith("| exact | 64x64 | 0% |")


def test_unpadded_path_runs_at_the_resized_size(setup, tmp_path):
  config, model, variables = setup
  # 30x42 images, test resize shortest edge 40 -> 40x56 (not a multiple of 32); a canvas it fits, one it
  # does not.
  report = bench.run(config, variables, model, source(tmp_path, (30, 42)), min_size=40, max_size=70,
                     canvases=[(64, 64), (32, 64)],
                     compiler_options=FAST_COMPILE)
  rec = report["images"][0]
  assert rec["orig_size"] == (30, 42)
  assert rec["inputs"] == {"exact": (40, 56), "pad32": (64, 64), "pad32_mean": (64, 64),
                           "canvas 64x64": (64, 64), "canvas 32x64": (32, 64)}
  assert rec["contents"]["exact"] == rec["contents"]["pad32"] == rec["contents"]["canvas 64x64"] == (40, 56)
  assert rec["contents"]["canvas 32x64"] == (32, 45)  # does not fit: shrunk, as our evaluation does
  s = report["summary"]
  assert s["exact"]["pixel_min"] == 1.0 and s["exact"]["padding_median"] == 0.0
  assert s["canvas 32x64"]["scale_median"] == pytest.approx(32 / 40)
  assert s["pad32"]["padding_median"] == pytest.approx(1 - 40 * 56 / 64 ** 2)
  # The padding reaches the outputs (GroupNorm statistics, attention, position embedding): not identical.
  assert min(s[k]["pixel_min"] for k in ("pad32", "pad32_mean", "canvas 64x64")) < 1.0


def info(*pairs):
  return [{"id": i, "category_id": c} for i, c in pairs]


def test_compare_pairs_segments_by_overlap():
  a = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 3, 3]])
  # The same segmentation with other ids: full agreement.
  b = np.array([[7, 7, 5, 5], [7, 7, 5, 5], [0, 0, 9, 9]])
  r = bench.compare((a, info((1, 1), (2, 1), (3, 2))), (b, info((7, 1), (5, 1), (9, 2))))
  assert r == dict(pixel=1.0, category=1.0, segments_a=3, segments_b=3)
  # Segments 1 and 2 (same class) merged into one: the pairing keeps the larger part of 4 + 4 pixels.
  c = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 3, 3]])
  r = bench.compare((a, info((1, 1), (2, 1), (3, 2))), (c, info((1, 1), (3, 2))))
  assert r["pixel"] == pytest.approx(8 / 12) and r["category"] == 1.0 and r["segments_b"] == 2
  # Segment 3 given another class, and a void pixel filled: both count against both measures.
  d = a.copy()
  d[2, 0] = 3
  r = bench.compare((a, info((1, 1), (2, 1), (3, 2))), (d, info((1, 1), (2, 1), (3, 4))))
  assert r["pixel"] == pytest.approx(9 / 12) and r["category"] == pytest.approx(9 / 12)
