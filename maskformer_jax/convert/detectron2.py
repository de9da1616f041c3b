"""Weights from the original MaskFormer's model-zoo files (detectron2 `.pkl`, or a `.pth` it trained).

The official COCO "+6 Enc" ResNet weights (PQ 46.5 / 47.6) exist only in this format; Hugging Face never
converted them. A file is a pickle of {"model": {name: numpy array}, "__author__": ...}
(docs/reference.md section 10). Its names are a pure function of our parameter paths (`d2_key`), so,
as for HF, every leaf must be found, every array of the file used and every shape agree, or one error
names all offenders.

Two details of the original's naming are undone before matching:
- the old key layout of the released files puts the pixel decoder directly under `sem_seg_head.`; the
  current code (and `normalise`) inserts `pixel_decoder.` (the original's own loader does the same);
- PyTorch's MultiheadAttention packs q, k, v as the rows of `in_proj_weight` / `in_proj_bias`; they are
  split into `...in_proj_weight[q]` etc., names that still point at the array in the file.

The official weights are released under CC BY-NC 4.0 (non-commercial); converting does not change that.
"""
import os
import pickle
import re
from collections.abc import Mapping

import flax
import numpy as np

from maskformer_jax.convert.hf import _BN, _LN, _to_numpy, abstract_variables, convert_state_dict
from maskformer_jax.convert.swin_imagenet import swin_key
from maskformer_jax.models import build_model

HEAD = "sem_seg_head."
PIXEL_DECODER = HEAD + "pixel_decoder."
PREDICTOR = HEAD + "predictor."
# Arrays that carry no weights we use: BN counters, the criterion's class weights, buffers rebuilt on the
# fly (Swin's relative_position_index / attn_mask), input normalisation constants.
D2_IGNORED = re.compile(r"(num_batches_tracked$|^criterion\.|relative_position_index$|attn_mask$"
                        r"|^pixel_(mean|std)$)")
_FPN = {"res5_output": "layer_4", "res4_lateral": "adapter_3", "res4_output": "layer_3",
        "res3_lateral": "adapter_2", "res3_output": "layer_2", "res2_lateral": "adapter_1",
        "res2_output": "layer_1"}
_NORMS = {"encoder": {"self_attn_norm": "norm1", "ffn_norm": "norm2"},
          "decoder": {"self_attn_norm": "norm1", "cross_attn_norm": "norm2", "ffn_norm": "norm3"}}
_ATTN = {"self_attn": "self_attn", "cross_attn": "multihead_attn"}
_QKV = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}


def _param(leaf: str, base: str, transform: str) -> tuple[str, str]:
  """A conv / linear / norm leaf of ours -> the torch name under `base`."""
  name = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}[leaf]
  return base + name, transform if leaf == "kernel" else ""


def _resnet_key(path) -> tuple[str, str]:
  mod, sub, leaf = path
  if mod == "stem":
    base = "backbone.stem.conv1."
  else:
    stage, block = re.fullmatch(r"res(\d)_(\d+)", mod).groups()
    conv = "shortcut" if sub.startswith("shortcut") else "conv" + sub[-1]
    base = f"backbone.res{stage}.{block}.{conv}."
  if sub in ("conv", "shortcut") or sub.startswith("conv"):
    return base + "weight", "conv"
  return base + "norm." + _BN[leaf], ""


def _attn_layer_key(path, base: str, kind: str) -> tuple[str, str]:
  """Our encoder / decoder layer leaves -> torch nn.TransformerEncoderLayer / DecoderLayer names."""
  sub, *rest = path
  if sub == "ffn":
    fc, leaf = rest
    return _param(leaf, f"{base}linear{fc[-1]}.", "linear")
  if sub.endswith("_norm"):
    return base + _NORMS[kind][sub] + "." + _LN[rest[0]], ""
  proj, leaf = rest
  attn = base + _ATTN[sub] + "."
  if proj == "out_proj":
    return _param(leaf, attn + "out_proj.", "linear")
  name = "in_proj_weight" if leaf == "kernel" else "in_proj_bias"
  return f"{attn}{name}[{_QKV[proj]}]", "linear" if leaf == "kernel" else ""


def d2_key(path: tuple[str, ...]) -> tuple[str, str]:
  """(the original's state-dict key, transform) for one of our leaves (current key layout)."""
  top, *rest = path
  if top == "backbone":
    if rest[0].startswith(("stem", "res")):
      return _resnet_key(rest)
    key, transform = swin_key(tuple(rest))  # the official Swin names; MaskFormer's norm{s} included
    return "backbone." + key, transform
  if top == "pixel_decoder":
    mod, *rest = rest
    if mod in _FPN:
      sub, leaf = rest
      base = PIXEL_DECODER + _FPN[mod] + "."
      return (base + "weight", "conv") if sub == "conv" else (base + "norm." + _LN[leaf], "")
    if mod in ("mask_features", "input_proj"):
      return _param(rest[0], f"{PIXEL_DECODER}{mod}.", "conv")
    i = re.fullmatch(r"encoder_layer_(\d+)", mod).group(1)
    return _attn_layer_key(rest, f"{PIXEL_DECODER}transformer.encoder.layers.{i}.", "encoder")
  if top == "transformer_decoder":
    mod, *rest = rest
    if mod == "query_embed":
      return PREDICTOR + "query_embed.weight", ""
    if mod == "input_proj":
      return _param(rest[0], PREDICTOR + "input_proj.", "conv")
    if mod == "decoder_norm":
      return PREDICTOR + "transformer.decoder.norm." + _LN[rest[0]], ""
    i = re.fullmatch(r"layer_(\d+)", mod).group(1)
    return _attn_layer_key(rest, f"{PREDICTOR}transformer.decoder.layers.{i}.", "decoder")
  if top == "class_embed":
    return _param(rest[0], PREDICTOR + "class_embed.", "linear")
  if top == "mask_embed":
    j = re.fullmatch(r"layer_(\d+)", rest[0]).group(1)
    return _param(rest[1], f"{PREDICTOR}mask_embed.layers.{j}.", "linear")
  raise KeyError(f"no original name for {'/'.join(path)}")


def normalise(state_dict: Mapping) -> dict:
  """The current key layout with packed attention projections split (see the module docstring)."""
  out = {}
  for key, value in state_dict.items():
    if key.startswith(HEAD) and not key.startswith((PREDICTOR, PIXEL_DECODER)):
      key = PIXEL_DECODER + key[len(HEAD):]  # the old layout of the released files
    if key in out:
      raise ValueError(f"{key} appears in both the old and the new key layout; the file is inconsistent.")
    value = _to_numpy(value)
    if key.endswith(("in_proj_weight", "in_proj_bias")):
      if value.shape[0] % 3:
        raise ValueError(f"{key} has {value.shape[0]} rows, not 3 x the model width (packed q, k, v).")
      for name, part in zip("qkv", np.split(value, 3, axis=0)):
        out[f"{key}[{name}]"] = part
    else:
      out[key] = value
  return out


def read_detectron2(path) -> dict:
  """The {name: array} of a model-zoo `.pkl` ({"model": ...}) or of a `.pth` the original trained."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"detectron2 checkpoint {path} does not exist.")
  if path.endswith(".pkl"):
    with open(path, "rb") as f:
      data = pickle.load(f, encoding="latin1")  # as detectron2 reads them (files from Python 2 days)
  else:
    import torch  # only needed for .pth files
    data = torch.load(path, map_location="cpu", weights_only=False)
  if isinstance(data, Mapping) and "model" in data:
    data = data["model"]
  if not isinstance(data, Mapping) or not data or not all(hasattr(v, "shape") for v in data.values()):
    raise ValueError(f"{path} is not a detectron2 checkpoint: expected a dict whose 'model' maps names to "
                     f"arrays (a model-zoo model_final_*.pkl or a model_*.pth the original wrote).")
  return dict(data)


def from_detectron2(path_or_state_dict, model_config: Mapping) -> dict:
  """Variables of the model `model_config` (our config.model keys) from an original checkpoint."""
  source = path_or_state_dict
  if isinstance(source, Mapping):
    state_dict, name = source, "detectron2 state dict"
  else:
    state_dict, name = read_detectron2(source), f"detectron2 checkpoint {os.fspath(source)}"
  template = abstract_variables(build_model(dict(model_config)))
  return convert_state_dict(normalise(state_dict), template, d2_key, ignore=D2_IGNORED, source=name)


def to_detectron2(variables) -> dict:
  """Our variables in the original's (current) naming, packed q, k, v included: the inverse of
  `from_detectron2`, used to check a conversion arrays-for-arrays."""
  out, parts = {}, {}
  for col, tree in variables.items():
    for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items():
      key, transform = d2_key(path)
      value = np.asarray(value, np.float32)
      if transform == "conv" and value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
      elif transform == "linear" and value.ndim == 2:
        value = value.T
      m = re.fullmatch(r"(.*)\[([qkv])\]", key)
      if m:
        parts.setdefault(m.group(1), {})[m.group(2)] = value
      else:
        out[key] = value
  for key, qkv in parts.items():
    out[key] = np.concatenate([qkv[n] for n in "qkv"], 0)
  return out
