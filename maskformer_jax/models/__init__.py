"""MaskFormer models (Flax linen, NHWC): `build_model(config.model)` and `normalize_image`."""
import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp

from maskformer_jax.models.backbone import RESNET_STAGES, ResNet, stage_channels
from maskformer_jax.models.maskformer import MaskFormer
from maskformer_jax.models.pixel_decoder import PixelDecoder
from maskformer_jax.models.transformer_decoder import TransformerDecoder

PIXEL_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255 scale (SPEC.md section 1)
PIXEL_STD = (58.395, 57.12, 57.375)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(MaskFormer) if f.name not in ("parent", "name"))


def normalize_image(images):
  """uint8 (or 0-255 float) RGB NHWC -> float32 normalised with the original mean/std."""
  x = jnp.asarray(images).astype(jnp.float32)
  return (x - jnp.asarray(PIXEL_MEAN, jnp.float32)) / jnp.asarray(PIXEL_STD, jnp.float32)


def build_model(model_config: Mapping) -> MaskFormer:
  """A MaskFormer from `config.model` (a ConfigDict or plain dict; missing keys take the defaults).

  Values are checked here so that a bad config fails before any tracing.
  """
  cfg = {k: model_config[k] for k in MODEL_KEYS if k in model_config}
  dtype = cfg.get("dtype", "float32")
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"model.dtype={dtype!r} is not supported; use one of {sorted(_DTYPES)}.")
    cfg["dtype"] = _DTYPES[dtype]
  checks = {
      "backbone": (cfg.get("backbone", "resnet") == "resnet", "use 'resnet'"),
      "resnet_depth": (cfg.get("resnet_depth", 50) in RESNET_STAGES, f"use one of {sorted(RESNET_STAGES)}"),
      "backbone_norm": (cfg.get("backbone_norm", "frozen_bn") in ("frozen_bn", "bn"), "use 'frozen_bn' or 'bn'"),
      "pixel_decoder": (cfg.get("pixel_decoder", "base") in ("base", "transformer_encoder"),
                        "use 'base' or 'transformer_encoder'"),
      "conv_dim": (cfg.get("conv_dim", 256) % 32 == 0, "must be a multiple of 32 (GroupNorm(32))"),
      "hidden_dim": (cfg.get("hidden_dim", 256) % 2 == 0 and cfg.get("num_heads", 8) > 0
                     and cfg.get("hidden_dim", 256) % cfg.get("num_heads", 8) == 0
                     and cfg.get("conv_dim", 256) % cfg.get("num_heads", 8) == 0,
                     "must be even and divisible by num_heads (as must conv_dim)"),
      "num_classes": (cfg.get("num_classes", 133) >= 1, "must be >= 1"),
      "num_queries": (cfg.get("num_queries", 100) >= 1, "must be >= 1"),
      "dec_layers": (cfg.get("dec_layers", 6) >= 1, "must be >= 1"),
  }
  for key, (ok, hint) in checks.items():
    if not ok:
      raise ValueError(f"model.{key}={model_config.get(key, '<default>')!r} is invalid: {hint}.")
  return MaskFormer(**cfg)


__all__ = ["build_model", "normalize_image", "MaskFormer", "ResNet", "PixelDecoder", "TransformerDecoder",
           "MODEL_KEYS", "PIXEL_MEAN", "PIXEL_STD", "stage_channels"]
