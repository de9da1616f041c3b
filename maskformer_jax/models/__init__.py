"""MaskFormer and Mask2Former (Flax linen, NHWC): `build_model(config.model)` and `normalize_image`."""
import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp

from maskformer_jax import registry
from maskformer_jax.models.backbone import ResNet, stage_channels
from maskformer_jax.models.mask2former import Mask2Former
from maskformer_jax.models.maskformer import MaskFormer
from maskformer_jax.models.pixel_decoder import PixelDecoder
from maskformer_jax.models.transformer_decoder import TransformerDecoder

PIXEL_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255 scale (docs/reference.md section 1)
PIXEL_STD = (58.395, 57.12, 57.375)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config.model.dtype (compute)
# config.model.arch -> the model class; its dataclass fields are the config.model keys it reads.
ARCHS = {"maskformer": MaskFormer, "mask2former": Mask2Former}


def model_keys(arch: str = "maskformer") -> tuple[str, ...]:
  """The config.model keys the model of `arch` reads (its fields), in field order."""
  return tuple(f.name for f in dataclasses.fields(registry.get(ARCHS, arch, "model.arch"))
               if f.name not in ("parent", "name"))


MODEL_KEYS = model_keys("maskformer")


def normalize_image(images, image_size=None):
  """uint8 (or 0-255 float) RGB NHWC -> float32 normalised with the original mean/std.

  With `image_size` ([B, 2] content height, width) everything outside the content becomes 0, i.e. the
  pixel mean: the original (detectron2's ImageList) pads normalised images with zeros, and nothing in
  the model masks padding, so its value reaches the predictions.
  """
  x = jnp.asarray(images).astype(jnp.float32)
  x = (x - jnp.asarray(PIXEL_MEAN, jnp.float32)) / jnp.asarray(PIXEL_STD, jnp.float32)
  if image_size is None:
    return x
  size = jnp.asarray(image_size)
  rows = jnp.arange(x.shape[1])[None, :, None] < size[:, 0, None, None]
  cols = jnp.arange(x.shape[2])[None, None, :] < size[:, 1, None, None]
  return jnp.where((rows & cols)[..., None], x, 0.0)


def build_model(model_config: Mapping):
  """The model `config.model.arch` names ("maskformer" when absent, as in configs written before it
  existed), from `config.model` (a ConfigDict or plain dict; missing keys take the model's defaults,
  keys of the other architecture are ignored).

  The values are checked by maskformer_jax.config.validate before anything is built; an unknown
  backbone or pixel decoder also fails here, at the first trace, naming the key.
  """
  arch = model_config["arch"] if "arch" in model_config else "maskformer"
  cfg = {k: model_config[k] for k in model_keys(arch) if k in model_config}
  cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}  # JSON lists (swin_depths)
  if isinstance(cfg.get("dtype"), str):
    cfg["dtype"] = registry.get(DTYPES, cfg["dtype"], "model.dtype")
  return ARCHS[arch](**cfg)


__all__ = ["build_model", "model_keys", "normalize_image", "ARCHS", "MaskFormer", "Mask2Former", "ResNet", "PixelDecoder", "TransformerDecoder",
           "MODEL_KEYS", "PIXEL_MEAN", "PIXEL_STD", "DTYPES", "stage_channels"]
