"""Weights from Hugging Face `transformers` MaskFormer (ResNet and Swin backbones) into our Flax model.

Every leaf of our model is named in HF's state dict by `hf_key` (a pure function of our path), so the
mapping is checked in both directions: leaves HF lacks, HF keys we don't use, and shapes that disagree
are all reported at once by `convert_state_dict`.

Where HF deviates from the original (docs/reference.md section 6) our model follows the original; for the weights
this is invisible (same parameters), it matters for:
- auxiliary outputs: ours are heads(decoder_norm(layer output)), HF's come from un-normalised hidden
  states; the main outputs (`class_queries_logits`, `masks_queries_logits`) agree. The parity test
  rebuilds the original's aux outputs from HF's hidden states with HF's own norm and heads.
- dropout: HF has no attention/activation dropout; inference is unaffected.
- "+6 Enc": HF has none. Its layers are DETR encoder layers; `hf_key` names them as if HF's pixel
  decoder held `input_projection` and `encoder_layers.{i}` (DetrEncoderLayer names), which is how the
  tests assemble a torch reference from HF modules.
- the HF ResNet puts the stride in the 3x3 conv (`downsample_in_bottleneck=False`) like detectron2 and
  torchvision; configs with the stride elsewhere are refused rather than silently mis-converted.
"""
import dataclasses
import os
import re
from collections.abc import Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from maskformer_jax.models import MODEL_KEYS, MaskFormer, build_model, stage_channels
from maskformer_jax.models.backbone import RESNET_STAGES

_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_LN = {"scale": "weight", "bias": "bias"}
_ATTN = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "out_proj": "o_proj"}
_DEC_LAYER = {"self_attn_norm": "self_attn_layer_norm", "cross_attn_norm": "encoder_attn_layer_norm",
              "ffn_norm": "final_layer_norm", "self_attn": "self_attn", "cross_attn": "encoder_attn"}
_FPN = {"res5_output": "fpn.stem", "res4_lateral": "fpn.layers.0.proj", "res4_output": "fpn.layers.0.block",
        "res3_lateral": "fpn.layers.1.proj", "res3_output": "fpn.layers.1.block",
        "res2_lateral": "fpn.layers.2.proj", "res2_output": "fpn.layers.2.block"}
# Keys that carry no model weights (HF's Swin also has a final LayerNorm that MaskFormer never uses).
HF_IGNORED = re.compile(r"(num_batches_tracked$|^criterion\.|relative_position_index$"
                        r"|^model\.pixel_level_module\.encoder\.model\.layernorm\.)")


def _leaf(kind: str, leaf: str, key: str):
  return key + {"kernel": "weight", "bias": "bias", "embedding": "weight"}[leaf], kind


def _resnet_key(path, prefix):
  """Our backbone path -> HF ResNetBackbone key under `prefix` (stride placement checked in config)."""
  mod, *rest = path
  if mod == "stem":
    sub, leaf = rest
    base = prefix + "embedder.embedder."
    return (base + "convolution.weight", "conv") if sub == "conv" else (base + "normalization." + _BN[leaf], "")
  stage, block = re.fullmatch(r"res(\d)_(\d+)", mod).groups()
  base = f"{prefix}encoder.stages.{int(stage) - 2}.layers.{block}."
  sub, leaf = rest
  if sub == "shortcut":
    return base + "shortcut.convolution.weight", "conv"
  if sub == "shortcut_bn":
    return base + "shortcut.normalization." + _BN[leaf], ""
  j = int(sub[-1]) - 1
  return (base + f"layer.{j}.convolution.weight", "conv") if sub.startswith("conv") else (
      base + f"layer.{j}.normalization.{_BN[leaf]}", "")


_SWIN_BLOCK = {"norm1": "layernorm_before.", "norm2": "layernorm_after.", "proj": "attention.output.dense.",
               "qkv": "attention.self.qkv.", "fc1": "intermediate.dense.", "fc2": "output.dense."}


def _swin_key(path, prefix):
  """Our Swin backbone path -> HF MaskFormerSwinBackbone key under `prefix`. HF keeps q, k and v apart;
  `pack_qkv` first writes them as the one `attention.self.qkv` entry the original (and we) have."""
  mod, *rest = path
  if mod == "patch_embed":
    sub, leaf = rest
    base = prefix + "model.embeddings."
    return _leaf("conv", leaf, base + "patch_embeddings.projection.") if sub == "proj" else (
        base + "norm." + _LN[leaf], "")
  if mod.startswith("norm"):
    return f"{prefix}hidden_states_norms.{mod[4:]}.{_LN[rest[0]]}", ""
  base = f"{prefix}model.encoder.layers.{mod.split('_')[1]}."
  sub, *rest = rest
  if sub == "downsample":
    part, leaf = rest
    return (base + "downsample.norm." + _LN[leaf], "") if part == "norm" else _leaf(
        "linear", leaf, base + "downsample.reduction.")
  base += f"blocks.{sub.split('_')[1]}."
  part, *rest = rest
  if part == "attn" and rest[0] == "relative_position_bias_table":
    return base + "attention.self.relative_position_bias_table", ""
  if part in ("attn", "mlp"):
    part, *rest = rest
  if part.startswith("norm"):
    return base + _SWIN_BLOCK[part] + _LN[rest[0]], ""
  return _leaf("linear", rest[0], base + _SWIN_BLOCK[part])


def pack_qkv(state_dict: Mapping) -> dict:
  """HF's separate attention.self.{query,key,value} -> one attention.self.qkv ([3C, C] rows q, k, v)."""
  out = dict(state_dict)
  for key in [k for k in state_dict if re.search(r"attention\.self\.query\.(weight|bias)$", k)]:
    parts = [out.pop(key.replace(".query.", f".{n}.")) for n in ("query", "key", "value")]
    out[key.replace(".query.", ".qkv.")] = np.concatenate([_to_numpy(p) for p in parts], 0)
  return out


def _attn_layer_key(path, base):
  """Our encoder/decoder layer path -> HF DETR layer key (`base` ends with the layer's dot)."""
  sub, *rest = path
  if sub == "ffn":
    fc, leaf = rest
    return _leaf("linear", leaf, f"{base}mlp.{fc}.")
  if sub.endswith("_norm"):
    return base + _DEC_LAYER[sub] + "." + _LN[rest[0]], ""
  proj, leaf = rest
  return _leaf("linear", leaf, f"{base}{_DEC_LAYER[sub]}.{_ATTN[proj]}.")


def hf_key(path: tuple[str, ...]) -> tuple[str, str]:
  """(HF state-dict key, transform) for one of our leaves; transform is 'conv', 'linear' or ''."""
  top, *rest = path
  if top == "backbone":
    prefix = "model.pixel_level_module.encoder."
    return _resnet_key(rest, prefix) if rest[0].startswith(("stem", "res")) else _swin_key(rest, prefix)
  if top == "pixel_decoder":
    d = "model.pixel_level_module.decoder."
    mod, *rest = rest
    if mod in _FPN:
      sub, leaf = rest
      return (f"{d}{_FPN[mod]}.0.weight", "conv") if sub == "conv" else (f"{d}{_FPN[mod]}.1.{_LN[leaf]}", "")
    if mod == "mask_features":
      return _leaf("conv", rest[0], d + "mask_projection.")
    if mod == "input_proj":
      return _leaf("conv", rest[0], d + "input_projection.")
    i = re.fullmatch(r"encoder_layer_(\d+)", mod).group(1)
    return _attn_layer_key(rest, f"{d}encoder_layers.{i}.")
  if top == "transformer_decoder":
    t = "model.transformer_module."
    mod, *rest = rest
    if mod == "query_embed":
      return t + "queries_embedder.weight", ""
    if mod == "input_proj":
      return _leaf("conv", rest[0], t + "input_projection.")
    if mod == "decoder_norm":
      return t + "decoder.layernorm." + _LN[rest[0]], ""
    i = re.fullmatch(r"layer_(\d+)", mod).group(1)
    return _attn_layer_key(rest, f"{t}decoder.layers.{i}.")
  if top == "class_embed":
    return _leaf("linear", rest[0], "class_predictor.")
  if top == "mask_embed":
    j = re.fullmatch(r"layer_(\d+)", rest[0]).group(1)
    return _leaf("linear", rest[1], f"mask_embedder.{j}.0.")
  raise KeyError(f"no HF name for {'/'.join(path)}")


def _to_flax(x: np.ndarray, transform: str) -> np.ndarray:
  if transform == "conv":  # torch OIHW -> flax HWIO
    return x.transpose(2, 3, 1, 0) if x.ndim == 4 else x
  if transform == "linear":  # torch [out, in] -> flax [in, out]
    return x.T if x.ndim == 2 else x
  return x


def abstract_variables(module) -> dict:
  """Shapes of the model's variables, without computing anything."""
  return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))


def _to_numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):  # torch tensor, without importing torch here
    v = v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
  return np.asarray(v)


def convert_state_dict(state_dict: Mapping, template: Mapping, key_fn: Callable, *,
                       ignore: re.Pattern | None = None, source: str = "state dict") -> dict:
  """Fills every leaf of `template` (variables or their shapes) from `state_dict` via `key_fn`.

  `key_fn(path) -> (key, transform)` names the source entry of our leaf at `path` (collection
  excluded). Raises one ValueError naming all missing, unexpected and mis-shaped keys.
  """
  missing, mis_shaped, used, out = [], [], set(), {}
  for col, tree in template.items():
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    for path, leaf in flat.items():
      key, transform = key_fn(path)
      if key not in state_dict:
        missing.append(f"{key} (for {col}/{'/'.join(path)})")
        continue
      used.add(key)
      value = _to_flax(_to_numpy(state_dict[key]), transform)
      if tuple(value.shape) != tuple(leaf.shape):
        mis_shaped.append(f"{key}: {tuple(value.shape)} after transposing, expected {tuple(leaf.shape)} "
                          f"for {col}/{'/'.join(path)}")
        continue
      out[(col, *path)] = value.astype(np.float32)
  unexpected = sorted(k for k in state_dict if k not in used and not (ignore and ignore.search(k)))
  if missing or unexpected or mis_shaped:
    lines = [f"{source} does not fit the model:"]
    for what, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
      if items:
        shown = "\n    ".join(items[:30]) + (f"\n    ... and {len(items) - 30} more" if len(items) > 30 else "")
        lines.append(f"  {len(items)} {what} key(s):\n    {shown}")
    lines.append("  Check that the model config (depth, widths, queries, classes, decoder) matches the weights.")
    raise ValueError("\n".join(lines))
  return flax.traverse_util.unflatten_dict(out)


def _swin_config_from_hf(bb) -> dict:
  """Our Swin keys for an HF (MaskFormer)SwinConfig; refuses what models/swin.py cannot express."""
  unsupported = {k: getattr(bb, k) for k, ok in (("patch_size", 4), ("num_channels", 3), ("mlp_ratio", 4.0),
                                                 ("qkv_bias", True), ("use_absolute_embeddings", False),
                                                 ("hidden_act", "gelu"), ("layer_norm_eps", 1e-5))
                 if getattr(bb, k) != ok}
  if unsupported or len(bb.depths) != 4:
    raise ValueError(f"HF Swin backbone with {unsupported or {'depths': list(bb.depths)}} is not the "
                     "original's Swin (patch 4, 3 channels, MLP ratio 4, qkv bias, no absolute position "
                     "embedding, GELU, LayerNorm eps 1e-5, 4 stages); not supported.")
  return {"backbone": "swin", "swin_embed_dim": bb.embed_dim, "swin_depths": tuple(bb.depths),
          "swin_num_heads": tuple(bb.num_heads), "swin_window_size": bb.window_size,
          "drop_path_rate": float(bb.drop_path_rate)}


def model_config_from_hf(hf_config) -> dict:
  """Our `config.model` keys for an HF MaskFormerConfig; refuses what our model cannot express."""
  bb, dec = hf_config.backbone_config, hf_config.decoder_config
  if list(getattr(bb, "out_features", None) or []) != ["stage1", "stage2", "stage3", "stage4"]:
    raise ValueError(f"HF backbone out_features={getattr(bb, 'out_features', None)}; MaskFormer needs "
                     "stage1..stage4.")
  if dec.activation_function != "relu":
    raise ValueError("only ReLU activations are supported in the transformer decoder.")
  head = {
      "backbone_norm": "frozen_bn", "pixel_decoder": "base", "conv_dim": hf_config.fpn_feature_size,
      "mask_dim": hf_config.mask_feature_size, "pixel_encoder_layers": 6,
      "num_queries": dec.num_queries, "hidden_dim": dec.d_model, "num_heads": dec.decoder_attention_heads,
      "dim_feedforward": dec.decoder_ffn_dim, "dec_layers": dec.decoder_layers, "dropout": float(dec.dropout),
      "enforce_input_proj": False, "num_classes": hf_config.num_labels, "dtype": "float32",
  }
  defaults = {f.name: f.default for f in dataclasses.fields(MaskFormer) if f.name in MODEL_KEYS}
  if getattr(bb, "model_type", None) in ("swin", "maskformer-swin"):
    return {**defaults, **head, **_swin_config_from_hf(bb)}
  if getattr(bb, "model_type", None) != "resnet":
    raise ValueError(f"only ResNet and Swin backbones convert; this HF model has "
                     f"{getattr(bb, 'model_type', bb)!r}.")
  bottleneck = bb.layer_type == "bottleneck"
  if len(bb.depths) != 4 or len(bb.hidden_sizes) != 4:
    raise ValueError(f"HF ResNet depths={list(bb.depths)} hidden_sizes={list(bb.hidden_sizes)}: MaskFormer "
                     "needs 4 stages (res2..res5).")
  if bottleneck and any(c % 4 for c in bb.hidden_sizes):
    raise ValueError(f"HF ResNet hidden_sizes={list(bb.hidden_sizes)} are not multiples of 4 (bottleneck).")
  # A standard ResNet is named by its depth; any other is the depth of its block type with its blocks
  # (and, for either, channels that differ from the standard ones) stated.
  width = bb.embedding_size
  standard = next((d for d, (bl, b) in RESNET_STAGES.items() if b == bottleneck and bl == tuple(bb.depths)),
                  None)
  depth = standard or next(d for d, (_, b) in RESNET_STAGES.items() if b == bottleneck)
  blocks = () if standard else tuple(bb.depths)
  channels = () if tuple(bb.hidden_sizes) == stage_channels(depth, width) else tuple(bb.hidden_sizes)
  if bb.downsample_in_first_stage or (bottleneck and bb.downsample_in_bottleneck):
    raise ValueError("HF ResNet with downsample_in_first_stage/downsample_in_bottleneck has the stride where "
                     "detectron2 does not; not supported.")
  if bb.hidden_act != "relu":
    raise ValueError("only ReLU activations are supported in the ResNet.")
  return {**defaults, **head, "backbone": "resnet", "resnet_depth": depth, "resnet_width": width,
          "resnet_blocks": blocks, "resnet_channels": channels}


def load_hf(hf):
  """A MaskFormerForInstanceSegmentation, or one loaded from a `save_pretrained` directory."""
  if isinstance(hf, (str, os.PathLike)):
    from transformers import MaskFormerForInstanceSegmentation
    if not os.path.isdir(hf):
      raise FileNotFoundError(f"{hf} is not a directory written by save_pretrained.")
    return MaskFormerForInstanceSegmentation.from_pretrained(os.fspath(hf), local_files_only=True).eval()
  if not hasattr(hf, "state_dict") or not hasattr(hf, "config"):
    raise TypeError(f"expected a MaskFormerForInstanceSegmentation or a directory, got {type(hf).__name__}.")
  return hf


def from_hf(hf):
  """(module, variables) equivalent to an HF MaskFormer (instance or save_pretrained directory)."""
  hf = load_hf(hf)
  cfg = model_config_from_hf(hf.config)
  assert set(cfg) == set(MODEL_KEYS), sorted(set(MODEL_KEYS) ^ set(cfg))
  module = build_model(cfg)
  state = pack_qkv(hf.state_dict())
  variables = convert_state_dict(state, abstract_variables(module), hf_key, ignore=HF_IGNORED,
                                 source="HF MaskFormer state dict")
  return module, variables


def check_hf_parity(hf, module, variables, size=(96, 128), tol=1e-3) -> dict:
  """Our converted model against the HF model on one fixed probe (standard normal, seed 0): max-abs
  differences of the class and mask logits. 1e-3 leaves room for float32 drift in deep models (the
  tests hold small ones to 1e-4); the JAX side runs at full float32 precision on any device."""
  import torch  # the HF model is a torch module, so torch is installed
  x = np.random.default_rng(0).standard_normal((1, *size, 3)).astype(np.float32)
  with torch.no_grad():
    ref = hf(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
  with jax.default_matmul_precision("highest"):  # TPU/GPU matmuls default to bf16/tf32 inputs
    out = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
  diffs = {name: float(np.max(np.abs(np.asarray(out[ours]) - theirs.numpy())))
           for name, ours, theirs in (("pred_logits", "pred_logits", ref.class_queries_logits),
                                      ("pred_masks", "pred_masks", ref.masks_queries_logits))}
  return {"name": f"forward parity with the HF model on a 1x{size[0]}x{size[1]} probe (seed 0)",
          "max_abs": diffs, "tolerance": tol, "passed": all(d <= tol for d in diffs.values())}
