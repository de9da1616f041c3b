"""The Swin backbone's own pieces (its HF parity is in test_convert.py): the shift mask against HF
MaskFormerSwin's, stochastic depth, the optimizer rules on Swin's names, bfloat16, and the COCO Swin-T
train step at a small size."""
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import MaskFormerSwinConfig
from transformers.models.maskformer.modeling_maskformer_swin import MaskFormerSwinLayer

from maskformer_jax import config as config_lib
from maskformer_jax import optim
from maskformer_jax.models import build_model
from maskformer_jax.models.swin import SwinTransformer, relative_position_index, shift_mask

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("hw,window", [((14, 21), 7), ((12, 24), 12), ((24, 36), 12)])
def test_shift_mask_and_relative_index_match_hf(hw, window):
  layer = MaskFormerSwinLayer(MaskFormerSwinConfig(window_size=window), dim=8, input_resolution=hw,
                              num_heads=1, shift_size=window // 2)
  ref = layer.get_attn_mask(hw).numpy()
  np.testing.assert_array_equal(shift_mask(*hw, window, window // 2), ref)
  assert (ref == -100).any() and (ref == 0).any()
  np.testing.assert_array_equal(relative_position_index(window),
                                layer.attention.self.relative_position_index.numpy())


def test_drop_path_only_in_training_and_random():
  m = SwinTransformer(16, (2, 2, 2, 2), (1, 1, 2, 2), 7, drop_path_rate=0.5)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64, 64, 3)), jnp.float32)
  v = jax.jit(m.init)(jax.random.key(0), x)
  evaluate = jax.jit(m.apply)
  train = jax.jit(lambda v, x, key: m.apply(v, x, train=True, rngs={"dropout": key}))
  a = evaluate(v, x)
  np.testing.assert_array_equal(np.asarray(a["res5"]), np.asarray(evaluate(v, x)["res5"]))
  t1, t2 = train(v, x, jax.random.key(1)), train(v, x, jax.random.key(2))
  assert not np.allclose(t1["res5"], a["res5"]) and not np.allclose(t1["res5"], t2["res5"])
  # Per example: with rate 0.5 on the deepest blocks some examples keep a branch that others drop.
  per_example = np.abs(np.asarray(t1["res5"]) - np.asarray(a["res5"])).reshape(4, -1).max(1)
  assert len(np.unique(np.round(per_example, 5))) > 1
  with pytest.raises(ValueError, match="Swin backbone needs .* multiples of 32; got 64x80: pad"):
    m.apply(v, jnp.zeros((1, 64, 80, 3)))


def test_swin_names_follow_the_optimizer_rules():
  """No weight decay on Swin's norms and relative position tables (the original's WEIGHT_DECAY_NORM and
  _EMBED 0), decay on its kernels; all of Swin is under backbone/ (the LR multiplier's scope)."""
  c = config_lib.load_config(f"{ROOT}/configs/coco_panoptic.py:backbone=swin_t,runlocal")
  params = jax.eval_shape(build_model(c.model).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  flat = lambda tree: {"/".join(str(k.key) for k in p): x  # noqa: E731
                       for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  decay, mult = flat(optim.decay_mask(c, params)), flat(optim.lr_multipliers(c, params))
  swin = [p for p in decay if p.startswith("backbone/")]
  assert len(swin) > 50 and all(mult[p] == c.optim.backbone_multiplier for p in swin)
  tables = [p for p in swin if p.endswith("relative_position_bias_table")]
  norms = [p for p in swin if re.search(r"/norm\d?/(scale|bias)$", p)]
  kernels = [p for p in swin if p.endswith("/kernel")]
  assert len(tables) == 8 and len(norms) == 2 * (2 * 8 + 1 + 3 + 4)  # blocks, patch embed, merges, outputs
  assert not any(decay[p] for p in tables + norms) and all(decay[p] for p in kernels)


def test_swin_t_bfloat16_forward_is_finite_and_close_to_float32():
  """Real Swin-T widths at 64x96 (random init): bfloat16 compute stays within 5% of the largest float32
  activation in every stage (bfloat16 keeps 8 bits of mantissa; 12 blocks of LayerNorm'd residuals)."""
  c = config_lib.load_config(f"{ROOT}/configs/coco_panoptic.py:backbone=swin_t").model
  args = (c.swin_embed_dim, tuple(c.swin_depths), tuple(c.swin_num_heads), c.swin_window_size)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 96, 3)), jnp.float32)
  f32 = SwinTransformer(*args)
  v = jax.jit(f32.init)(jax.random.key(0), x)
  ref = jax.jit(f32.apply)(v, x)
  out = jax.jit(SwinTransformer(*args, dtype=jnp.bfloat16).apply)(v, x)
  for k in ("res2", "res3", "res4", "res5"):
    assert out[k].dtype == jnp.bfloat16 and out[k].shape == ref[k].shape
    o, r = np.asarray(out[k], np.float32), np.asarray(ref[k])
    assert np.isfinite(o).all()
    assert np.abs(o - r).max() <= 0.05 * np.abs(r).max(), (k, np.abs(o - r).max(), np.abs(r).max())


@pytest.mark.slow
def test_coco_swin_t_train_step_runs_on_cpu():
  """configs/coco_panoptic.py:backbone=swin_t as published (Swin-T, FPN, enforced projection, 6 decoder
  layers, 100 queries, 133 classes, Swin's optimiser), at 64x64 with a batch of 2: compiles, runs, finite,
  and the gradient reaches the backbone. The suite's costliest compilation (~3 min on 2 cores)."""
  from _multihost_worker import FAST_COMPILE, make_batch
  from maskformer_jax import sharding, train_step
  c = config_lib.load_config(f"{ROOT}/configs/coco_panoptic.py:backbone=swin_t")
  c.batch_size, c.data.image_size, c.data.max_instances = 2, (64, 64), 8
  c.mesh.data = 1
  model = build_model(c.model)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  state = train_step.init_state(c, model, mesh, jax.random.key(0))
  assert "input_proj" in state["params"]["transformer_decoder"]  # enforced (res5: 768 channels anyway)
  batch = make_batch(0, batch_size=2)  # classes 0..4 of the 133
  batch["labels"][~batch["valid"]] = 133  # unused slots: no-object
  batch = train_step.shard_batch(batch, mesh)
  step = train_step.make_train_step(c, model, mesh).lower(state, batch).compile(FAST_COMPILE)
  state, metrics = step(state, batch)  # compiling (~3 min on 2 cores) dominates: one step
  assert np.isfinite(float(metrics["loss"][0])) and float(metrics["skipped"][0]) == 0
  # The first step's LR is the warm-up's start, 1e-6 of 6e-5 (too small to change a float32 weight), so
  # check that the gradient reached the backbone: AdamW's first moment of a deep Swin kernel.
  np.testing.assert_allclose(float(metrics["learning_rate"][0]), 6e-5 * 1e-6, rtol=1e-4)
  mu = jax.device_get(state["opt_state"][1].mu["backbone"]["layers_2"]["blocks_5"]["attn"]["qkv"]["kernel"])
  assert np.isfinite(mu).all() and np.abs(mu).max() > 0
