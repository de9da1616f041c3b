"""The original MaskFormer optimizer in optax (docs/reference.md section 3).

detectron2/MaskFormer `build_optimizer`: AdamW; parameters under the backbone get
lr * backbone_multiplier (decoupled weight decay is scaled by the same lr, as torch AdamW does);
weight decay 0 on every norm layer and embedding; "full_model" gradient clipping at global L2 norm
`clip_norm` before AdamW. Schedules follow detectron2's WarmupMultiStepLR / MaskFormer's WarmupPolyLR:
lr(t) = base_lr * warmup(t) * decay(t), with the linear warm-up factor multiplying the decay.

Which parameters are "backbone", "norm" or "embedding" is decided by regexes over the '/'-joined
parameter path: `config.optim.backbone_regex` / `no_decay_regex` (maskformer_jax/config.py), written
against the naming in maskformer_jax/models.
"""
import re

import jax
import jax.numpy as jnp
import optax

from maskformer_jax import registry


def _path(path):
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_labels(params, regex):
  """A bool pytree: True where the '/'-joined path matches `regex` (re.search)."""
  pattern = re.compile(regex)
  return jax.tree_util.tree_map_with_path(lambda p, _: bool(pattern.search(_path(p))), params)


def decay_mask(config, params):
  """True where weight decay applies (everything but norms and embeddings)."""
  no_decay = param_labels(params, config.optim.no_decay_regex)
  return jax.tree.map(lambda x: not x, no_decay)


def lr_multipliers(config, params):
  """Per-parameter LR multiplier: config.optim.backbone_multiplier under the backbone, else 1."""
  backbone = param_labels(params, config.optim.backbone_regex)
  mult = float(config.optim.backbone_multiplier)
  return jax.tree.map(lambda b: mult if b else 1.0, backbone)


def learning_rate(config):
  """The schedule step -> lr of config.optim.schedule ('step' or 'poly'), warm-up included.

  Warm-up (detectron2 'linear'): factor = w + (1 - w) * t / warmup_steps for t < warmup_steps, with
  w = config.optim.warmup_factor, so the first step runs at base_lr * w. A factor rather than an absolute
  LR, as in detectron2, so that sweeping base_lr keeps the warm-up's shape. The original COCO R50 recipe
  has WARMUP_FACTOR 1.0 (its 10 warm-up steps have no effect); the Swin recipes 1e-6 over 1500 steps.
  """
  o = config.optim
  base, warm = float(o.base_lr), int(o.warmup_steps)
  w0 = float(o.warmup_factor)
  total = float(config.total_steps)

  decay_fn = registry.get(SCHEDULES, o.schedule, "optim.schedule")

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    factor = jnp.where(t < warm, w0 + (1.0 - w0) * t / max(warm, 1), 1.0)
    return base * factor * decay_fn(o, t, total)

  return schedule


def step_decay(o, t, total):
  """detectron2 WarmupMultiStepLR: x decay_factor at each of decay_steps (bisect_right: from the
  milestone step itself)."""
  del total
  boundaries = jnp.asarray(tuple(o.decay_steps) or (jnp.inf,), jnp.float32)
  return jnp.asarray(o.decay_factor, jnp.float32) ** jnp.sum(t >= boundaries)


def poly_decay(o, t, total):
  """MaskFormer's WarmupPolyLR: (1 - t / total_steps) ** poly_power, 0 after total_steps."""
  return jnp.maximum(1.0 - t / total, 0.0) ** float(o.poly_power)


# config.optim.schedule -> decay(optim config, step as float32, total_steps) -> factor.
SCHEDULES = {"step": step_decay, "poly": poly_decay}


def _scale_by_multipliers(config):
  """Multiplies each update by its parameter's static LR multiplier (decided from its path)."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    mult = lr_multipliers(config, updates)
    return jax.tree.map(lambda u, m: u if m == 1.0 else u * m, updates, mult), state

  return optax.GradientTransformation(init, update)


def make_optimizer(config):
  """AdamW with full-model clipping, backbone LR multiplier and no decay on norms/embeddings."""
  o = config.optim
  return optax.chain(
      optax.clip_by_global_norm(float(o.clip_norm)),
      optax.scale_by_adam(b1=float(o.b1), b2=float(o.b2), eps=float(o.eps)),
      optax.add_decayed_weights(float(o.weight_decay), mask=lambda p: decay_mask(config, p)),
      optax.scale_by_learning_rate(learning_rate(config)),
      _scale_by_multipliers(config),
  )
