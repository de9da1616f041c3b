"""The original MaskFormer optimizer in optax (SPEC.md section 3).

detectron2/MaskFormer `build_optimizer`: AdamW; parameters under the backbone get
lr * backbone_multiplier (decoupled weight decay is scaled by the same lr, as torch AdamW does);
weight decay 0 on every norm layer and embedding; "full_model" gradient clipping at global L2 norm
`clip_norm` before AdamW. Schedules follow detectron2's WarmupMultiStepLR / MaskFormer's WarmupPolyLR:
lr(t) = base_lr * warmup(t) * decay(t), with the linear warm-up factor multiplying the decay.

Which parameters are "backbone", "norm" or "embedding" is decided by regexes over the '/'-joined
parameter path (config-driven: `config.optim.backbone_regex` / `no_decay_regex` when present, else the
defaults below, written against the naming in maskformer_jax/models).
"""
import re

import jax
import jax.numpy as jnp
import optax

# Parameter paths look like 'backbone/res2_0/conv1/kernel' (naming in models/maskformer.py). Norm
# modules (BatchNorm `*bn*`, GroupNorm `gn`, LayerNorm `*norm*`) and embeddings (the learned queries;
# Swin's position tables) get no weight decay, like detectron2's weight_decay_norm/_embed = 0. The
# heads `class_embed`/`mask_embed` are Linear layers and do get weight decay.
BACKBONE_REGEX = r"^backbone/"
NO_DECAY_REGEX = (r"(^|/)[^/]*(bn|gn|norm)[^/]*/(scale|bias)$|/embedding$|(^|/)query_embed/"
                  r"|relative_position_bias_table|absolute_pos_embed")


def _path(path):
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _opt(config, key, default):
  return config.optim[key] if key in config.optim else default


def param_labels(params, regex):
  """A bool pytree: True where the '/'-joined path matches `regex` (re.search)."""
  pattern = re.compile(regex)
  return jax.tree_util.tree_map_with_path(lambda p, _: bool(pattern.search(_path(p))), params)


def decay_mask(config, params):
  """True where weight decay applies (everything but norms and embeddings)."""
  no_decay = param_labels(params, _opt(config, "no_decay_regex", NO_DECAY_REGEX))
  return jax.tree.map(lambda x: not x, no_decay)


def lr_multipliers(config, params):
  """Per-parameter LR multiplier: config.optim.backbone_multiplier under the backbone, else 1."""
  backbone = param_labels(params, _opt(config, "backbone_regex", BACKBONE_REGEX))
  mult = float(config.optim.backbone_multiplier)
  return jax.tree.map(lambda b: mult if b else 1.0, backbone)


def learning_rate(config):
  """The schedule step -> lr of config.optim.schedule ('step' or 'poly'), warm-up included.

  Warm-up (detectron2 'linear'): factor = w + (1 - w) * t / warmup_steps for t < warmup_steps, with
  w = warmup_init_lr / base_lr, so the first step runs at warmup_init_lr. The original COCO recipe uses
  detectron2's WARMUP_FACTOR 1.0 (warm-up without effect); warmup_init_lr = base_lr reproduces it.
  """
  o = config.optim
  base, warm = float(o.base_lr), int(o.warmup_steps)
  w0 = float(o.warmup_init_lr) / base if base else 0.0
  total = float(config.total_steps)
  boundaries = jnp.asarray(tuple(o.decay_steps) or (total + 1,), jnp.float32)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    factor = jnp.where(t < warm, w0 + (1.0 - w0) * t / max(warm, 1), 1.0)
    if o.schedule == "step":
      # bisect_right(milestones, t): the decay applies from the milestone step itself.
      decay = jnp.asarray(o.decay_factor, jnp.float32) ** jnp.sum(t >= boundaries)
    elif o.schedule == "poly":
      decay = jnp.maximum(1.0 - t / total, 0.0) ** float(o.poly_power)
    else:
      raise ValueError(f"config.optim.schedule={o.schedule!r}: use 'step' or 'poly'")
    return base * factor * decay

  return schedule


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
