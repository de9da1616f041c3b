"""Weights of Hugging Face `transformers` Mask2Former (`Mask2FormerForUniversalSegmentation`) into ours.

As in convert/hf.py, every leaf of ours is named in HF's state dict by a pure function of its path
(`hf_key`), and `convert_state_dict` reports missing, unexpected and mis-shaped keys all at once.
`pixel_decoder_key` / `convert_pixel_decoder` serve the pixel decoder alone; `from_hf` the whole model.

What the names need beyond renames and transposes:
- HF's masked cross-attention is a torch nn.MultiheadAttention (one packed `in_proj_weight` [3C, C],
  rows q, k, v); `split_in_proj` writes it as the separate q/k/v projections we (and HF's
  self-attention) have.
- HF's plain Swin backbone (transformers 5) keeps q, k and v apart; `pack_swin_qkv` packs them into the
  one `qkv` projection of models/swin.py. Its final `swin.layernorm` is unused by Mask2Former and
  ignored. HF's SwinBackbone partitions windows at every resolution (`always_partition`), i.e. always
  shifts, as the original and models/swin.py do. Names are those of the installed transformers 5;
  transformers 4's (`attention.self.query`, `intermediate.dense`, no `swin.`) are not mapped.
- HF's pixel decoder keeps the FPN convs in plain Python lists as well as under `adapter_{k}`/`layer_{k}`
  (k = 1 for res2), so only the latter names are in its state dict.
- HF's `decoder_layers` counts the prediction before the first layer: ours is one less (`dec_layers`).
"""
import dataclasses
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from maskformer_jax.convert.hf import _resnet_key, _swin_config_from_hf, _to_numpy, convert_state_dict
from maskformer_jax.models import build_model, model_keys, stage_channels
from maskformer_jax.models.backbone import RESNET_STAGES
from maskformer_jax.models.mask2former import Mask2Former
from maskformer_jax.models.msdeform import MSDeformPixelDecoder

PIXEL_DECODER_PREFIX = "model.pixel_level_module.decoder."
BACKBONE_PREFIX = "model.pixel_level_module.encoder."
TRANSFORMER_PREFIX = "model.transformer_module."
# Keys that carry no model weights: BN counters, the loss's class weights, Swin's unused final norm.
HF_IGNORED = re.compile(r"(num_batches_tracked$|^criterion\.|relative_position_index$"
                        r"|^model\.pixel_level_module\.encoder\.swin\.layernorm\.)")
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


_DEC_LAYER = {"cross_attn_norm": "cross_attn_layer_norm", "self_attn_norm": "self_attn_layer_norm",
              "ffn_norm": "final_layer_norm"}
_EMBED = {"query_feat": "queries_features", "query_embed": "queries_embedder", "level_embed": "level_embed"}
_SWIN_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "qkv": "attention.qkv",
               "proj": "attention.o_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_LINEAR = {"kernel": "weight", "bias": "bias"}


def decoder_key(path: tuple[str, ...], prefix: str = TRANSFORMER_PREFIX) -> tuple[str, str]:
  """(HF key, transform) for one leaf of `MaskedAttentionDecoder` (path inside it). The class head is
  HF's top-level `class_predictor`; the q/k/v of `cross_attn` are named as `split_in_proj` writes them."""
  mod, *rest = path
  if mod in _EMBED:
    return f"{prefix}{_EMBED[mod]}.weight", ""
  if mod == "class_embed":
    return "class_predictor." + _LINEAR[rest[0]], "linear"
  if mod == "decoder_norm":
    return f"{prefix}decoder.layernorm.{_LEAF[rest[0]]}", ""
  if mod == "mask_embed":
    j = re.fullmatch(r"layer_(\d)", rest[0]).group(1)
    return f"{prefix}decoder.mask_predictor.mask_embedder.{j}.0.{_LINEAR[rest[1]]}", "linear"
  m = re.fullmatch(r"input_proj_(\d)", mod)
  if m:
    return f"{prefix}input_projections.{m.group(1)}.{_LINEAR[rest[0]]}", "conv"
  m = re.fullmatch(r"layer_(\d+)", mod)
  if m:
    base = f"{prefix}decoder.layers.{m.group(1)}."
    sub, *rest = rest
    if sub in _DEC_LAYER:
      return base + _DEC_LAYER[sub] + "." + _LEAF[rest[0]], ""
    if sub == "ffn":
      return f"{base}{rest[0]}.{_LINEAR[rest[1]]}", "linear"
    if sub in ("cross_attn", "self_attn"):
      return f"{base}{sub}.{rest[0]}.{_LINEAR[rest[1]]}", "linear"
  raise KeyError(f"no HF name for decoder leaf {'/'.join(path)}")


def swin_key(path: tuple[str, ...], prefix: str = BACKBONE_PREFIX) -> tuple[str, str]:
  """(HF key, transform) for one leaf of models/swin.py's SwinTransformer in HF's plain SwinBackbone
  (after `pack_swin_qkv`)."""
  mod, *rest = path
  base = prefix + "swin."
  if mod == "patch_embed":
    sub, leaf = rest
    return (f"{base}embeddings.patch_embeddings.projection.{_LINEAR[leaf]}", "conv") if sub == "proj" else (
        f"{base}embeddings.norm.{_LEAF[leaf]}", "")
  m = re.fullmatch(r"norm(\d)", mod)
  if m:
    return f"{prefix}hidden_states_norms.stage{int(m.group(1)) + 1}.{_LEAF[rest[0]]}", ""
  base += f"encoder.layers.{mod.split('_')[1]}."
  sub, *rest = rest
  if sub == "downsample":
    part, leaf = rest
    return f"{base}downsample.{part}.{_LEAF[leaf]}", ("" if part == "norm" else "linear")
  base += f"blocks.{sub.split('_')[1]}."
  part, *rest = rest
  if part == "attn" and rest[0] == "relative_position_bias_table":
    return base + "attention.relative_position_bias.relative_position_bias_table", ""
  if part in ("attn", "mlp"):
    part, *rest = rest
  return f"{base}{_SWIN_BLOCK[part]}.{_LEAF[rest[0]]}", ("" if part.startswith("norm") else "linear")


def hf_key(path: tuple[str, ...]) -> tuple[str, str]:
  """(HF state-dict key, transform) for one leaf of our Mask2Former (collection excluded)."""
  top, *rest = path
  if top == "backbone":
    return _resnet_key(rest, BACKBONE_PREFIX) if rest[0].startswith(("stem", "res")) else swin_key(rest)
  if top == "pixel_decoder":
    return pixel_decoder_key(tuple(rest))
  if top == "transformer_decoder":
    return decoder_key(tuple(rest))
  raise KeyError(f"no HF name for {'/'.join(path)}")


def split_in_proj(state_dict: Mapping) -> dict:
  """nn.MultiheadAttention's packed `in_proj_{weight,bias}` (rows q, k, v) -> `{q,k,v}_proj.{weight,bias}`."""
  out = dict(state_dict)
  for key in [k for k in state_dict if re.search(r"\.in_proj_(weight|bias)$", k)]:
    base, leaf = key.rsplit(".in_proj_", 1)
    for name, part in zip(("q", "k", "v"), np.split(_to_numpy(out.pop(key)), 3, axis=0)):
      out[f"{base}.{name}_proj.{leaf}"] = part
  return out


def pack_swin_qkv(state_dict: Mapping) -> dict:
  """HF Swin's separate `attention.{q,k,v}_proj` -> one `attention.qkv` ([3C, C], rows q, k, v)."""
  out = dict(state_dict)
  for key in [k for k in state_dict if re.search(r"\.blocks\.\d+\.attention\.q_proj\.(weight|bias)$", k)]:
    parts = [out.pop(key.replace(".q_proj.", f".{n}_proj.")) for n in ("q", "k", "v")]
    out[key.replace(".q_proj.", ".qkv.")] = np.concatenate([_to_numpy(p) for p in parts], 0)
  return out


def _resnet_config_from_hf(bb) -> dict:
  """Our ResNet keys for an HF ResNetConfig (as convert/hf.py's model_config_from_hf decides them)."""
  bottleneck = bb.layer_type == "bottleneck"
  if len(bb.depths) != 4 or len(bb.hidden_sizes) != 4:
    raise ValueError(f"HF ResNet depths={list(bb.depths)} hidden_sizes={list(bb.hidden_sizes)}: the pixel "
                     "decoder needs 4 stages (res2..res5).")
  if bottleneck and any(c % 4 for c in bb.hidden_sizes):
    raise ValueError(f"HF ResNet hidden_sizes={list(bb.hidden_sizes)} are not multiples of 4 (bottleneck).")
  if bb.downsample_in_first_stage or (bottleneck and bb.downsample_in_bottleneck):
    raise ValueError("HF ResNet with downsample_in_first_stage/downsample_in_bottleneck has the stride where "
                     "detectron2 does not; not supported.")
  if bb.hidden_act != "relu":
    raise ValueError("only ReLU activations are supported in the ResNet.")
  width = bb.embedding_size
  standard = next((d for d, (bl, b) in RESNET_STAGES.items() if b == bottleneck and bl == tuple(bb.depths)),
                  None)
  depth = standard or next(d for d, (_, b) in RESNET_STAGES.items() if b == bottleneck)
  channels = () if tuple(bb.hidden_sizes) == stage_channels(depth, width) else tuple(bb.hidden_sizes)
  return {"backbone": "resnet", "backbone_norm": "frozen_bn", "resnet_depth": depth, "resnet_width": width,
          "resnet_blocks": () if standard else tuple(bb.depths), "resnet_channels": channels}


def model_config_from_hf(hf_config) -> dict:
  """Our Mask2Former keys (models/mask2former.py's fields) for an HF Mask2FormerConfig; refuses what our
  model cannot express. HF's `dropout` (0.0, as the original) only acts in training and is not modelled."""
  bb = hf_config.backbone_config
  if list(getattr(bb, "out_features", None) or []) != ["stage1", "stage2", "stage3", "stage4"]:
    raise ValueError(f"HF backbone out_features={getattr(bb, 'out_features', None)}; Mask2Former needs "
                     "stage1..stage4.")
  if list(hf_config.feature_strides) != [4, 8, 16, 32] or hf_config.common_stride != 4:
    raise ValueError(f"feature_strides={list(hf_config.feature_strides)}, common_stride={hf_config.common_stride}: "
                     "the pixel decoder reads res2..res5 (strides 4..32) and predicts masks at stride 4.")
  if hf_config.activation_function != "relu" or hf_config.pre_norm:
    raise ValueError(f"activation_function={hf_config.activation_function!r}, pre_norm={hf_config.pre_norm}: "
                     "only the original's post-norm ReLU decoder is supported.")
  if hf_config.decoder_layers < 2:
    raise ValueError(f"decoder_layers={hf_config.decoder_layers}: HF counts the prediction before the first "
                     "layer, so at least 2 are needed.")
  kind = getattr(bb, "model_type", None)
  if kind == "swin":
    backbone = _swin_config_from_hf(bb)
  elif kind == "resnet":
    backbone = _resnet_config_from_hf(bb)
  else:
    raise ValueError(f"only ResNet and Swin backbones convert; this HF model has {kind or bb!r}.")
  defaults = {f.name: f.default for f in dataclasses.fields(Mask2Former) if f.name in model_keys("mask2former")}
  return {"arch": "mask2former", **defaults, **backbone, "conv_dim": hf_config.feature_size, "mask_dim": hf_config.mask_feature_size,
          "pixel_encoder_layers": hf_config.encoder_layers,
          "pixel_dim_feedforward": hf_config.encoder_feedforward_dim, "pixel_num_points": 4,
          "num_queries": hf_config.num_queries, "hidden_dim": hf_config.hidden_dim,
          "num_heads": hf_config.num_attention_heads, "dim_feedforward": hf_config.dim_feedforward,
          "dec_layers": hf_config.decoder_layers - 1, "enforce_input_proj": bool(hf_config.enforce_input_projection),
          "num_classes": hf_config.num_labels, "dtype": "float32"}


def load_hf(hf):
  """A Mask2FormerForUniversalSegmentation, or one loaded from a `save_pretrained` directory."""
  if isinstance(hf, (str, os.PathLike)):
    from transformers import Mask2FormerForUniversalSegmentation
    if not os.path.isdir(hf):
      raise FileNotFoundError(f"{hf} is not a directory written by save_pretrained.")
    return Mask2FormerForUniversalSegmentation.from_pretrained(os.fspath(hf), local_files_only=True).eval()
  if not hasattr(hf, "state_dict") or not hasattr(hf, "config"):
    raise TypeError(f"expected a Mask2FormerForUniversalSegmentation or a directory, got {type(hf).__name__}.")
  return hf


def convert_mask2former(state_dict: Mapping, module: Mask2Former) -> dict:
  """Variables (`params`, `batch_stats`) of `module` from an HF Mask2Former state dict; one ValueError
  names every missing, unexpected and mis-shaped key."""
  template = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  state = pack_swin_qkv(split_in_proj(state_dict))
  return convert_state_dict(state, template, hf_key, ignore=HF_IGNORED, source="HF Mask2Former state dict")


def from_hf(hf):
  """(module, variables) equivalent to an HF Mask2Former (instance or save_pretrained directory)."""
  hf = load_hf(hf)
  module = build_model(model_config_from_hf(hf.config))
  return module, convert_mask2former(hf.state_dict(), module)


def hf_predictions(hf, images_nhwc: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
  """Every prediction of the HF model, (class logits, mask logits) before the first layer and after each."""
  import torch  # the HF model is a torch module, so torch is installed
  with torch.no_grad():
    out = hf(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))),
             output_hidden_states=True, output_auxiliary_logits=True)
  preds = [(a["class_queries_logits"], a["masks_queries_logits"]) for a in out.auxiliary_logits]
  preds.append((out.class_queries_logits, out.masks_queries_logits))
  return [(c.numpy(), m.numpy()) for c, m in preds]


def check_hf_parity(hf, module, variables, size=(96, 128), tol=1e-3) -> dict:
  """Our converted model against the HF model on one fixed probe (standard normal, seed 0): the max-abs
  differences of the class and mask logits of every prediction (before the first layer and after each).
  1e-3 leaves room for float32 drift in deep models (the tests hold small ones to 1e-4); a mask logit
  within that of 0 may flip an attention mask and move later layers more. The JAX side runs at full
  float32 precision on any device."""
  x = np.random.default_rng(0).standard_normal((1, *size, 3)).astype(np.float32)
  theirs = hf_predictions(hf, x)
  with jax.default_matmul_precision("highest"):  # TPU/GPU matmuls default to bf16/tf32 inputs
    out = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
  ours = [(o["pred_logits"], o["pred_masks"]) for o in [*out["aux_outputs"], out]]
  if len(ours) != len(theirs):
    raise ValueError(f"{len(ours)} predictions of ours against {len(theirs)} of HF's.")
  diffs = {"pred_logits": [], "pred_masks": []}
  for (oc, om), (tc, tm) in zip(ours, theirs):
    diffs["pred_logits"].append(float(np.max(np.abs(np.asarray(oc) - tc))))
    diffs["pred_masks"].append(float(np.max(np.abs(np.asarray(om) - tm))))
  return {"name": f"forward parity with the HF Mask2Former on a 1x{size[0]}x{size[1]} probe (seed 0), "
                  f"{len(ours)} predictions",
          "max_abs": {k: max(v) for k, v in diffs.items()}, "per_prediction": diffs, "tolerance": tol,
          "passed": all(d <= tol for v in diffs.values() for d in v)}
