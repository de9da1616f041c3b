"""Mask2Former: backbone -> deformable-attention pixel decoder -> masked-attention decoder with heads.

`model.apply(variables, images, train=...)` takes normalised NHWC float32 images (any size with a
ResNet; multiples of 32 with Swin) and returns MaskFormer's output format (float32 whatever the
compute dtype), so the criterion and inference code take either model::

  {'pred_logits': [B, Q, K+1] (no-object LAST), 'pred_masks': [B, Q, ceil(H/4), ceil(W/4)],
   'aux_outputs': [{'pred_logits', 'pred_masks'} before layer 0, after layers 0..L-2]}

so `dec_layers` layers give `dec_layers` auxiliary predictions (the original's deep supervision; HF's
config counts one more, `decoder_layers` = dec_layers + 1).

Variable layout and naming (MaskFormer's conventions; convert/hf_mask2former.py maps them onto HF's)
- Collections: `params` and `batch_stats` (backbone BatchNorm statistics), exactly as MaskFormer.
- Top-level scopes: `backbone` (the ResNet or Swin of models/backbone.py and models/swin.py, built by
  the same BACKBONES builders from the same fields), `pixel_decoder` (models/msdeform.py:
  `input_proj_{0,1,2}/{conv,gn}`, `level_embed`, `encoder_layer_{i}`, `res2_lateral`, `res2_output`,
  `mask_features`) and `transformer_decoder` (models/masked_attention.py: `query_feat`, `query_embed`,
  `level_embed`, `input_proj_{0,1,2}`, `layer_{i}`, `decoder_norm`, `class_embed`, `mask_embed`).
- Norm modules and only they contain `bn`, `gn` or `norm` in their name (`gn`, `self_attn_norm`,
  `cross_attn_norm`, `ffn_norm`, `decoder_norm`, the backbone's), leaves `scale` and `bias`.
- The decoder's learned queries, query positions and level embeddings are `embedding` leaves of
  `nn.Embed` modules (no weight decay, as the original's nn.Embedding); the pixel decoder's
  `level_embed` is a plain parameter (an nn.Parameter in the original, so it is decayed).
- Everything else is `kernel` (convs HWIO, dense [in, out]) or `bias`.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from maskformer_jax import registry
from maskformer_jax.models.backbone import BACKBONES
from maskformer_jax.models.masked_attention import MaskedAttentionDecoder
from maskformer_jax.models.msdeform import METHODS, MSDeformPixelDecoder


class Mask2Former(nn.Module):
  """config.model.arch = 'mask2former' (models/__init__.py ARCHS). Fields shared with MaskFormer keep its names (backbone fields read by the BACKBONES builders, conv_dim,
  mask_dim, ...); the defaults are Mask2Former's (docs/reference.md section 12). `num_heads` serves both the
  deformable encoder and the decoder, as in the original and HF."""
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
  conv_dim: int = 256
  mask_dim: int = 256
  pixel_encoder_layers: int = 6
  pixel_dim_feedforward: int = 1024
  pixel_num_points: int = 4
  msdeform_method: str = "gather"  # models/msdeform.py METHODS: "gather", or "matmul" for gather-hostile chips
  num_queries: int = 100
  hidden_dim: int = 256
  num_heads: int = 8
  dim_feedforward: int = 2048
  dec_layers: int = 9
  enforce_input_proj: bool = False
  num_classes: int = 133
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be NHWC [B, H, W, 3]; got shape {images.shape}.")
    if self.msdeform_method not in METHODS:
      raise ValueError(f"model.msdeform_method={self.msdeform_method!r} is not one of {METHODS}.")
    feats = registry.get(BACKBONES, self.backbone, "model.backbone")(self, self.dtype, "backbone")(
        images, train)
    mask_features, multi_scale = MSDeformPixelDecoder(
        self.conv_dim, self.mask_dim, self.pixel_encoder_layers, self.num_heads, self.pixel_num_points,
        self.pixel_dim_feedforward, 4, self.msdeform_method, self.dtype, self.remat,
        name="pixel_decoder")(feats, train)
    logits, masks = MaskedAttentionDecoder(
        self.num_queries, self.hidden_dim, self.num_heads, self.dim_feedforward, self.dec_layers, self.mask_dim,
        self.num_classes, self.enforce_input_proj, self.dtype, self.remat,
        name="transformer_decoder")(multi_scale, mask_features)
    return {
        "pred_logits": logits[-1],
        "pred_masks": masks[-1],
        "aux_outputs": [{"pred_logits": logits[i], "pred_masks": masks[i]} for i in range(self.dec_layers)],
    }

