"""ImageNet initialisation of the backbone from a torchvision ResNet state dict (`.pth`).

The original starts from torchvision's R-50 (detectron2's `ImageNetPretrained/torchvision/R-50.pkl`
with STRIDE_IN_1X1=False): torchvision puts the stride in `conv2` (the 3x3) exactly like our blocks, so
the mapping is name-for-name: conv1/bn1 -> stem, layer{k}.{i}.conv{j}/bn{j} -> res{k+1}_{i}, and
downsample.0/1 -> shortcut/shortcut_bn. `fc.*` (the ImageNet classifier) and BN `num_batches_tracked`
are dropped; anything else that does not fit is an error naming the keys.
"""
import os
import re
from collections.abc import Mapping

import flax

from maskformer_jax.convert.hf import _BN, convert_state_dict

TORCHVISION_IGNORED = re.compile(r"(^fc\.|num_batches_tracked$)")


def torchvision_key(path: tuple[str, ...]) -> tuple[str, str]:
  """(torchvision key, transform) for a leaf of our backbone (path below the `backbone` scope)."""
  mod, sub, leaf = path
  if mod == "stem":
    return ("conv1.weight", "conv") if sub == "conv" else (f"bn1.{_BN[leaf]}", "")
  stage, block = re.fullmatch(r"res(\d)_(\d+)", mod).groups()
  base = f"layer{int(stage) - 1}.{block}."
  if sub == "shortcut":
    return base + "downsample.0.weight", "conv"
  if sub == "shortcut_bn":
    return base + f"downsample.1.{_BN[leaf]}", ""
  return (base + sub + ".weight", "conv") if sub.startswith("conv") else (base + f"{sub}.{_BN[leaf]}", "")


def read_state_dict(path_or_state_dict) -> Mapping:
  """A state dict from a `.pth` file (torch.load, weights only) or as given."""
  if isinstance(path_or_state_dict, Mapping):
    return path_or_state_dict
  path = os.fspath(path_or_state_dict)
  if not os.path.exists(path):
    raise FileNotFoundError(f"torchvision ResNet state dict {path} does not exist.")
  import torch  # only needed to read .pth files
  sd = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(sd, Mapping):
    raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict (save model.state_dict()).")
  return sd


def load_torchvision_resnet(path_or_state_dict, variables: Mapping) -> dict:
  """`variables` with every backbone leaf replaced from a torchvision ResNet state dict.

  Works for frozen BN (scale/bias/mean/var in batch_stats) and trainable BN (scale/bias in params) alike;
  the rest of `variables` is returned unchanged. The depth must match (R50 weights for an R50 model).
  """
  sd = read_state_dict(path_or_state_dict)
  variables = flax.core.unfreeze(variables)
  template = {col: tree["backbone"] for col, tree in variables.items() if "backbone" in tree}
  if not template:
    raise ValueError("variables have no 'backbone' scope: pass the variables of a MaskFormer model.")
  new = convert_state_dict(sd, template, torchvision_key, ignore=TORCHVISION_IGNORED,
                           source="torchvision ResNet state dict")
  out = dict(variables)
  for col, tree in new.items():
    out[col] = {**variables[col], "backbone": tree}
  return out
