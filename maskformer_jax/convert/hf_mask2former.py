"""Weights of Hugging Face `transformers` Mask2Former into our Flax modules (so far: the pixel decoder).

As in convert/hf.py, every leaf of ours is named in HF's state dict by a pure function of its path, and
`convert_state_dict` reports missing, unexpected and mis-shaped keys all at once. Keys outside the
pixel decoder's prefix (backbone, transformer module, criterion) are left alone.

HF's pixel decoder keeps the FPN convs in plain Python lists as well as under `adapter_{k}`/`layer_{k}`
(k = 1 for res2), so only the latter names are in its state dict.
"""
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from maskformer_jax.convert.hf import convert_state_dict
from maskformer_jax.models.msdeform import MSDeformPixelDecoder

PIXEL_DECODER_PREFIX = "model.pixel_level_module.decoder."
_NORMS = {"self_attn_norm": "self_attn_layer_norm", "ffn_norm": "final_layer_norm"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}  # conv, linear, GroupNorm, LayerNorm


def pixel_decoder_key(path: tuple[str, ...], prefix: str = PIXEL_DECODER_PREFIX) -> tuple[str, str]:
  """(HF key, transform) for one leaf of `MSDeformPixelDecoder` (path inside the module, no collection)."""
  mod, *rest = path
  if mod == "level_embed":
    return prefix + "level_embed", ""
  if mod == "mask_features":
    return prefix + "mask_projection." + _LEAF[rest[0]], "conv"
  m = re.fullmatch(r"input_proj_(\d+)", mod)
  if m:  # Sequential(conv, GroupNorm)
    sub, leaf = rest
    return f"{prefix}input_projections.{m.group(1)}.{0 if sub == 'conv' else 1}.{_LEAF[leaf]}", (
        "conv" if sub == "conv" else "")
  m = re.fullmatch(r"res(\d)_(lateral|output)", mod)
  if m:  # HF: adapter_{k} (1x1 conv + GN) and layer_{k} (3x3 conv + GN + ReLU), k = 1 for res2
    sub, leaf = rest
    name = f"{'adapter' if m.group(2) == 'lateral' else 'layer'}_{int(m.group(1)) - 1}"
    return f"{prefix}{name}.{0 if sub == 'conv' else 1}.{_LEAF[leaf]}", "conv" if sub == "conv" else ""
  m = re.fullmatch(r"encoder_layer_(\d+)", mod)
  if m:
    base = f"{prefix}encoder.layers.{m.group(1)}."
    sub, *rest = rest
    if sub in _NORMS:
      return base + _NORMS[sub] + "." + _LEAF[rest[0]], ""
    if sub == "ffn":  # fc1, fc2
      return f"{base}{rest[0]}.{_LEAF[rest[1]]}", "linear"
    if sub == "self_attn":  # sampling_offsets, attention_weights, value_proj, output_proj
      return f"{base}self_attn.{rest[0]}.{_LEAF[rest[1]]}", "linear"
  raise KeyError(f"no HF name for pixel decoder leaf {'/'.join(path)}")


def pixel_decoder_from_hf_config(hf_config, **overrides) -> MSDeformPixelDecoder:
  """Our pixel decoder for an HF Mask2FormerConfig (feature_size, mask_feature_size, encoder sizes).

  HF's `dropout` (0.0 by default and in the original) only acts in training and is not modelled.
  """
  strides = list(hf_config.feature_strides)
  if strides != [4, 8, 16, 32]:
    raise ValueError(f"feature_strides={strides}: the pixel decoder reads res2..res5 (strides 4..32).")
  kwargs = dict(conv_dim=hf_config.feature_size, mask_dim=hf_config.mask_feature_size,
                encoder_layers=hf_config.encoder_layers, num_heads=hf_config.num_attention_heads,
                dim_feedforward=hf_config.encoder_feedforward_dim, common_stride=hf_config.common_stride)
  return MSDeformPixelDecoder(**{**kwargs, **overrides})


def convert_pixel_decoder(state_dict: Mapping, module: MSDeformPixelDecoder, channels: Mapping[str, int],
                          prefix: str = PIXEL_DECODER_PREFIX) -> dict:
  """Flax `params` of `module` from an HF Mask2Former state dict (torch tensors or numpy arrays).

  `channels` maps 'res2'..'res5' to the backbone's channels (the input projections' fan-in). Only keys
  starting with `prefix` are considered (pass '' for a bare `Mask2FormerPixelDecoder.state_dict()`);
  raises one ValueError naming every missing, unexpected or mis-shaped key.
  """
  feats = {f"res{k}": jax.ShapeDtypeStruct((1, 2 ** (7 - k), 2 ** (7 - k), channels[f"res{k}"]), jnp.float32)
           for k in (2, 3, 4, 5)}
  template = jax.eval_shape(lambda f: module.init(jax.random.key(0), f), feats)
  ours = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
  variables = convert_state_dict(ours, {"params": template["params"]}, lambda p: pixel_decoder_key(p, prefix),
                                 source="HF Mask2Former pixel decoder state dict")
  return variables["params"]
