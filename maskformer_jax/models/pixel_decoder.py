"""Pixel decoders: the original `BasePixelDecoder` (an FPN with GroupNorm) and "+6 Enc".

Both return `(mask_features, transformer_input)`: per-pixel embeddings at stride 4 (`mask_dim`
channels) and the map the transformer decoder reads. For the base decoder the latter is res5 itself;
for `TransformerEncoderPixelDecoder` ("+6 Enc") it is the encoder output, *before* the FPN's res5
output conv, as in the original (`transformer_encoder_features`).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from maskformer_jax.models.conv import Conv
from maskformer_jax.models.transformer_decoder import EncoderLayer, sine_position_embedding

GN_GROUPS = 32
GN_EPS = 1e-5  # torch default (flax's is 1e-6)
# detectron2's c2_xavier_fill (kaiming uniform, a=1), used for every pixel-decoder conv.
_c2_xavier = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def upsample_nearest(x, size):
  """torch `F.interpolate(mode='nearest')` to (h, w): source index floor(i * in / out)."""
  (h, w), (ih, iw) = size, x.shape[1:3]
  if (h, w) == (2 * ih, 2 * iw):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = (jnp.arange(h) * ih) // h
  cols = (jnp.arange(w) * iw) // w
  return x[:, rows][:, :, cols]


class ConvGN(nn.Module):
  """Conv (no bias) + GroupNorm(32) [+ ReLU]: detectron2's Conv2d(norm="GN")."""
  features: int
  kernel: int
  relu: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.features % GN_GROUPS:
      raise ValueError(f"conv_dim={self.features} must be a multiple of {GN_GROUPS} (GroupNorm groups).")
    p = self.kernel // 2
    x = Conv(self.features, (self.kernel, self.kernel), padding=((p, p), (p, p)), use_bias=False,
                kernel_init=_c2_xavier, dtype=self.dtype, param_dtype=jnp.float32, name="conv")(x)
    x = nn.GroupNorm(GN_GROUPS, epsilon=GN_EPS, dtype=self.dtype, param_dtype=jnp.float32, name="gn")(x)
    return nn.relu(x) if self.relu else x


class PixelDecoder(nn.Module):
  """FPN over res2..res5, optionally with a transformer encoder on res5 ("+6 Enc").

  Variables: `res5_output`, `res{4,3,2}_lateral`, `res{4,3,2}_output` (each `conv` + `gn`),
  `mask_features` (3x3 conv with bias); with the encoder also `input_proj` (1x1 conv with bias) and
  `encoder_layer_{i}`.
  """
  conv_dim: int = 256
  mask_dim: int = 256
  encoder_layers: int = 0  # 0: BasePixelDecoder; >0: TransformerEncoderPixelDecoder
  num_heads: int = 8
  dim_feedforward: int = 2048
  dropout: float = 0.1
  dtype: Any = jnp.float32
  remat: bool = False  # recompute each encoder layer's activations in the backward pass

  @nn.compact
  def __call__(self, feats, train: bool = False):
    res5 = feats["res5"].astype(self.dtype)
    if self.encoder_layers:
      b, h, w, _ = res5.shape
      x = Conv(self.conv_dim, (1, 1), kernel_init=_c2_xavier, dtype=self.dtype, param_dtype=jnp.float32,
                  name="input_proj")(res5).reshape(b, h * w, self.conv_dim)
      pos = jnp.asarray(sine_position_embedding(h, w, self.conv_dim // 2), self.dtype)[None]
      layer = nn.remat(EncoderLayer, static_argnums=(3,)) if self.remat else EncoderLayer  # `train`
      for i in range(self.encoder_layers):
        x = layer(self.conv_dim, self.num_heads, self.dim_feedforward, self.dropout, self.dtype,
                         name=f"encoder_layer_{i}")(x, pos, train)
      transformer_input = x.reshape(b, h, w, self.conv_dim)
      y = ConvGN(self.conv_dim, 3, True, self.dtype, name="res5_output")(transformer_input)
    else:
      transformer_input = res5
      y = ConvGN(self.conv_dim, 3, True, self.dtype, name="res5_output")(res5)
    for level in ("res4", "res3", "res2"):
      lateral = ConvGN(self.conv_dim, 1, False, self.dtype, name=f"{level}_lateral")(feats[level].astype(self.dtype))
      y = lateral + upsample_nearest(y, lateral.shape[1:3])
      y = ConvGN(self.conv_dim, 3, True, self.dtype, name=f"{level}_output")(y)
    mask_features = Conv(self.mask_dim, (3, 3), padding=((1, 1), (1, 1)), kernel_init=_c2_xavier,
                            dtype=self.dtype, param_dtype=jnp.float32, name="mask_features")(y)
    return mask_features, transformer_input


def base(cfg, dtype, name):
  """config.model.pixel_decoder = 'base': the FPN alone (BasePixelDecoder)."""
  return PixelDecoder(cfg.conv_dim, cfg.mask_dim, 0, cfg.num_heads, cfg.dim_feedforward, cfg.dropout,
                      dtype, name=name)  # no layer worth recomputing: remat does not apply


def transformer_encoder(cfg, dtype, name):
  """'transformer_encoder' ("+6 Enc"): pixel_encoder_layers encoder layers on res5, then the FPN."""
  return PixelDecoder(cfg.conv_dim, cfg.mask_dim, cfg.pixel_encoder_layers, cfg.num_heads,
                      cfg.dim_feedforward, cfg.dropout, dtype, bool(cfg.remat), name=name)


# config.model.pixel_decoder -> builder(model fields, compute dtype, scope name) -> a module mapping the
# backbone's features to (mask_features at stride 4, the transformer decoder's memory at stride 32).
PIXEL_DECODERS = {"base": base, "transformer_encoder": transformer_encoder}
