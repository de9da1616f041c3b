"""MaskFormer: backbone -> pixel decoder -> transformer decoder -> class and mask heads.

`model.apply(variables, images, train=...)` takes normalised NHWC float32 images (any size with a
ResNet, as the original; multiples of 32 with Swin) and returns (float32 whatever the compute dtype)::

  {'pred_logits': [B, Q, K+1] (no-object LAST), 'pred_masks': [B, Q, ceil(H/4), ceil(W/4)],
   'aux_outputs': [{'pred_logits', 'pred_masks'} for decoder layers 0..L-2]}

The heads run on every decoder layer's output after the shared `decoder_norm` (original deep
supervision; HF instead builds aux logits from un-normalised states).

Variable layout and naming conventions (stable: optimizer rules match on these paths)
- Collections: `params` (trainable, float32) and `batch_stats` (backbone BatchNorm statistics).
  'frozen_bn': every backbone BN leaf (`scale`, `bias`, `mean`, `var`) is in `batch_stats`, never
  trained. 'bn': `scale`/`bias` in `params`, `mean`/`var` in `batch_stats` (apply with
  `mutable=['batch_stats']` when training).
- Top-level scopes: `backbone` (everything of the ResNet or Swin, so `^backbone/` selects the backbone
  LR multiplier), `pixel_decoder`, `transformer_decoder`, `class_embed`, `mask_embed`.
- Normalisation layers are the modules named `*bn*` (BatchNorm: `backbone/stem/bn`,
  `backbone/res2_0/bn1`, `.../shortcut_bn`), `gn` (GroupNorm: `pixel_decoder/res4_lateral/gn`) and
  `*norm*` (LayerNorm: `.../self_attn_norm`, `cross_attn_norm`, `ffn_norm`,
  `transformer_decoder/decoder_norm`; Swin's `norm1`, `norm2`, `patch_embed/norm`, `downsample/norm`,
  `norm0..3`); their leaves are `scale` and `bias`. No other module name
  contains `bn`, `gn` or `norm`: the regex `(^|/)[^/]*(bn|gn|norm)[^/]*/(scale|bias)$` selects exactly
  the norm parameters.
- The learned queries are `transformer_decoder/query_embed/embedding` (an embedding: no weight decay
  in the original), as are Swin's `relative_position_bias_table`s.
- Everything else is `kernel` (convs HWIO, dense [in, out]) or `bias`.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from maskformer_jax import registry
from maskformer_jax.models.backbone import BACKBONES
from maskformer_jax.models.pixel_decoder import PIXEL_DECODERS
from maskformer_jax.models.transformer_decoder import TransformerDecoder

# torch nn.Linear default init (kaiming uniform a=sqrt(5) -> U(+-1/sqrt(fan_in))), used by the heads.
_torch_linear = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class MLP(nn.Module):
  """The mask-embedding MLP: Linear-ReLU-Linear-ReLU-Linear (`layer_0..2`)."""
  hidden: int
  out: int
  num_layers: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = nn.Dense(self.out if i == self.num_layers - 1 else self.hidden, kernel_init=_torch_linear,
                   dtype=self.dtype, param_dtype=jnp.float32, name=f"layer_{i}")(x)
      if i < self.num_layers - 1:
        x = nn.relu(x)
    return x


class MaskFormer(nn.Module):
  """Fields mirror the keys of `config.model` (see maskformer_jax/config.py); build with build_model.

  The backbone and pixel decoder are looked up by name in models/backbone.py's BACKBONES and
  models/pixel_decoder.py's PIXEL_DECODERS; each builder reads the fields it needs from this module.
  """
  backbone: str = "resnet"
  resnet_depth: int = 50
  resnet_width: int = 64
  resnet_blocks: tuple = ()
  resnet_channels: tuple = ()
  backbone_norm: str = "frozen_bn"
  swin_embed_dim: int = 96
  swin_depths: tuple = (2, 2, 6, 2)
  swin_num_heads: tuple = (3, 6, 12, 24)
  swin_window_size: int = 7
  drop_path_rate: float = 0.3
  pixel_decoder: str = "base"
  conv_dim: int = 256
  mask_dim: int = 256
  pixel_encoder_layers: int = 6
  num_queries: int = 100
  hidden_dim: int = 256
  num_heads: int = 8
  dim_feedforward: int = 2048
  dec_layers: int = 6
  dropout: float = 0.1
  enforce_input_proj: bool = False
  num_classes: int = 133
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be NHWC [B, H, W, 3]; got shape {images.shape}.")
    feats = registry.get(BACKBONES, self.backbone, "model.backbone")(self, self.dtype, "backbone")(
        images, train)
    make_decoder = registry.get(PIXEL_DECODERS, self.pixel_decoder, "model.pixel_decoder")
    mask_features, memory = make_decoder(self, self.dtype, "pixel_decoder")(feats, train)
    hs = TransformerDecoder(self.num_queries, self.hidden_dim, self.num_heads, self.dim_feedforward,
                            self.dec_layers, self.dropout, self.enforce_input_proj, self.dtype,
                            self.remat, name="transformer_decoder")(memory, train)  # [L, B, Q, hidden]
    logits = nn.Dense(self.num_classes + 1, kernel_init=_torch_linear, dtype=self.dtype,
                      param_dtype=jnp.float32, name="class_embed")(hs)
    mask_embed = MLP(self.hidden_dim, self.mask_dim, 3, self.dtype, name="mask_embed")(hs)
    masks = jnp.einsum("lbqc,bhwc->lbqhw", mask_embed, mask_features.astype(self.dtype))
    logits, masks = logits.astype(jnp.float32), masks.astype(jnp.float32)
    return {
        "pred_logits": logits[-1],
        "pred_masks": masks[-1],
        "aux_outputs": [{"pred_logits": logits[i], "pred_masks": masks[i]} for i in range(self.dec_layers - 1)],
    }
