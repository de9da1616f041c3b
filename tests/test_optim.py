"""The optimizer: schedules against hand-computed values, LR multipliers and weight-decay masks by
inspecting updates, full-model clipping."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from maskformer_jax import optim
from maskformer_jax.config import base_config


def config(**optim_overrides):
  c = base_config()
  c.total_steps = 100
  for k, v in optim_overrides.items():
    c.optim[k] = v
  return c


def test_step_schedule_with_linear_warmup():
  c = config(schedule="step", base_lr=1e-4, warmup_steps=10, warmup_factor=0.0, decay_steps=(50, 80),
             decay_factor=0.1)
  lr = optim.learning_rate(c)
  expected = {0: 0.0, 5: 0.5e-4, 9: 0.9e-4, 10: 1e-4, 49: 1e-4, 50: 1e-5, 79: 1e-5, 80: 1e-6, 99: 1e-6}
  for t, v in expected.items():
    np.testing.assert_allclose(float(lr(t)), v, rtol=1e-6, atol=1e-12, err_msg=f"step {t}")


def test_step_schedule_warmup_factor_one_is_constant():
  """detectron2's WARMUP_FACTOR 1.0 (the original COCO recipe): its 10 warm-up steps change nothing."""
  c = config(schedule="step", base_lr=1e-4, warmup_steps=10, warmup_factor=1.0, decay_steps=(50,))
  lr = optim.learning_rate(c)
  assert [float(lr(t)) for t in (0, 3, 9, 10)] == pytest.approx([1e-4] * 4, rel=1e-6)


def test_poly_schedule_with_warmup():
  """MaskFormer's WarmupPolyLR: base * warmup_factor(t) * (1 - t / max_iters) ** 0.9."""
  c = config(schedule="poly", base_lr=6e-5, warmup_steps=10, warmup_factor=1e-2, poly_power=0.9)
  lr = optim.learning_rate(c)
  w0 = 1e-2
  for t in (0, 4, 10, 37, 99):
    warm = w0 + (1 - w0) * t / 10 if t < 10 else 1.0
    np.testing.assert_allclose(float(lr(t)), 6e-5 * warm * (1 - t / 100) ** 0.9, rtol=1e-5)
  np.testing.assert_allclose(float(lr(0)), 6e-7, rtol=1e-5)
  np.testing.assert_allclose(float(lr(50)), 6e-5 * 0.5 ** 0.9, rtol=1e-5)
  assert float(lr(100)) == 0.0


def test_unknown_schedule_is_an_error():
  with pytest.raises(ValueError, match="schedule"):
    optim.learning_rate(config(schedule="cosine"))(0)


PARAMS = {
    "backbone": {"stem": {"conv": {"kernel": 1.0}, "bn": {"scale": 1.0, "bias": 1.0}}},
    "pixel_decoder": {"res3_output": {"conv": {"kernel": 1.0}, "gn": {"scale": 1.0, "bias": 1.0}},
                      "mask_features": {"kernel": 1.0, "bias": 1.0}},
    "transformer_decoder": {"layer_0": {"self_attn_norm": {"scale": 1.0, "bias": 1.0}},
                            "query_embed": {"embedding": 1.0}},
    "class_embed": {"kernel": 1.0, "bias": 1.0},
}
NO_DECAY = {"backbone/stem/bn/scale", "backbone/stem/bn/bias", "pixel_decoder/res3_output/gn/scale",
            "pixel_decoder/res3_output/gn/bias", "transformer_decoder/layer_0/self_attn_norm/scale",
            "transformer_decoder/layer_0/self_attn_norm/bias", "transformer_decoder/query_embed/embedding"}


def flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def one_update(c, grad_value):
  params = jax.tree.map(lambda v: jnp.full((3,), v, jnp.float32), PARAMS)
  grads = jax.tree.map(lambda p: jnp.full_like(p, grad_value), params)
  tx = optim.make_optimizer(c)
  updates, _ = tx.update(grads, tx.init(params), params)
  return {k: float(v[0]) for k, v in flat(updates).items()}


def test_weight_decay_masks_and_backbone_multiplier():
  """Zero gradients: the whole update is decoupled weight decay, -lr * mult * wd * p (torch AdamW
  scales decay by the group's lr), and exactly 0 on norms and embeddings."""
  c = config(base_lr=1e-3, weight_decay=0.05, backbone_multiplier=0.1, warmup_steps=0)
  updates = one_update(c, 0.0)
  assert set(updates) == {k for k in flat(PARAMS)}
  for name, u in updates.items():
    mult = 0.1 if name.startswith("backbone/") else 1.0
    expected = 0.0 if name in NO_DECAY else -1e-3 * mult * 0.05 * 1.0
    np.testing.assert_allclose(u, expected, rtol=1e-6, atol=0, err_msg=name)


def test_adam_update_with_multiplier_and_no_decay():
  """Equal gradients, no decay: the first Adam step is -lr * mult * g / (|g| + eps) everywhere, g the
  gradient after clipping to global norm 0.01."""
  c = config(base_lr=1e-3, weight_decay=0.0, backbone_multiplier=0.1, warmup_steps=0)
  g = 0.01 / np.sqrt(3 * len(flat(PARAMS)))
  for name, u in one_update(c, 0.5).items():
    mult = 0.1 if name.startswith("backbone/") else 1.0
    np.testing.assert_allclose(u, -1e-3 * mult * g / (g + 1e-8), rtol=3e-5, err_msg=name)


def test_full_model_clipping():
  """With a huge Adam eps the first update is ~ -lr * g_clipped / eps, so the clipped gradient is
  visible: one global norm over all parameters (backbone included), scaled down to clip_norm."""
  c = config(base_lr=1.0, weight_decay=0.0, backbone_multiplier=1.0, warmup_steps=0, eps=1e6,
             clip_norm=0.01)
  params = {"backbone": {"a": jnp.zeros((4,))}, "head": {"b": jnp.zeros((5,))}}
  grads = {"backbone": {"a": jnp.full((4,), 3.0)}, "head": {"b": jnp.full((5,), -4.0)}}
  tx = optim.make_optimizer(c)
  updates, _ = tx.update(grads, tx.init(params), params)
  norm = np.sqrt(4 * 9 + 5 * 16)
  scale = 0.01 / norm
  np.testing.assert_allclose(np.asarray(updates["backbone"]["a"]), -3.0 * scale / 1e6, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(updates["head"]["b"]), 4.0 * scale / 1e6, rtol=1e-4)


def test_masks_on_the_real_model_naming():
  """Against the model's parameter names (abstract init, nothing compiled): exactly the norm
  scales/biases and the learned queries are excluded from weight decay, and only `backbone/`
  parameters get the LR multiplier."""
  from maskformer_jax.models import build_model
  from maskformer_jax.config import load_config
  c = load_config(f"{pathlib.Path(__file__).parent.parent}/configs/coco_panoptic.py:runlocal")
  model = build_model(c.model)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                             train=False))["params"]
  decay = flat(optim.decay_mask(c, params))
  mult = flat(optim.lr_multipliers(c, params))
  no_decay = {k for k, v in decay.items() if not v}
  norms = {k for k in decay if any(s in k.split("/")[-2] for s in ("bn", "gn", "norm"))}
  assert norms and norms <= no_decay
  assert no_decay - norms == {"transformer_decoder/query_embed/embedding"}
  assert all(decay[k] for k in decay if k.startswith(("class_embed/", "mask_embed/")))
  assert all(k.endswith(("/scale", "/bias", "/embedding")) for k in no_decay)
  assert {k for k, v in mult.items() if v != 1.0} == {k for k in mult if k.startswith("backbone/")}
  assert set(mult.values()) == {1.0, c.optim.backbone_multiplier}
