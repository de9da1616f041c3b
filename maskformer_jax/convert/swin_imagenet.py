"""ImageNet initialisation of the Swin backbone from an official Swin release file (`.pth`).

The original starts its Swin backbones from the official ImageNet files (`{"model": state_dict}`); our
Swin keeps the official names, so the mapping is a rename plus transposes (`swin_key`). What the file has
and we don't is dropped and logged: `relative_position_index` and `attn_mask` (rebuilt from the window),
the final `norm` and the classifier `head`. What we have and the file doesn't, the per-stage output norms
`norm0..norm3`, stays at its init (as in the original, which loads non-strictly); any other difference is
an error naming the keys. A file trained with another window has its relative position tables resized
bicubically like the official loader (torch's `F.interpolate(mode='bicubic')`, done here in numpy).
A plain state dict and timm's layout (downsample at the start of the next stage, `head.fc`) load too.
"""
import collections
import math
import os
import re
from collections.abc import Mapping

from absl import logging
import flax
import numpy as np

from maskformer_jax.convert.hf import _to_numpy, convert_state_dict
from maskformer_jax.convert.torchvision import read_state_dict

SWIN_DROPPED = re.compile(r"(relative_position_index$|attn_mask$|^head\.|^norm\.)")
OUTPUT_NORM = re.compile(r"norm\d+")  # our per-stage output norms; not in an ImageNet file
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def swin_key(path: tuple[str, ...]) -> tuple[str, str]:
  """(official key, transform) for a leaf of our Swin (path below the `backbone` scope): the same names
  with `layers_{s}`/`blocks_{b}` as `layers.{s}`/`blocks.{b}`."""
  *mods, leaf = path
  name = ".".join(re.sub(r"_(\d+)$", r".\1", m) for m in mods)
  if leaf == "relative_position_bias_table":
    return f"{name}.{leaf}", ""
  transform = ("conv" if mods[0] == "patch_embed" else "linear") if leaf == "kernel" else ""
  return f"{name}.{_LEAF[leaf]}", transform


def _keys_cubic(x, a=-0.75):
  """Keys' cubic convolution kernel; torch's bicubic interpolation uses a = -0.75."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's 1-D bicubic resize (align_corners=False, edges clamped)."""
  src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
  base = np.floor(src)
  m = np.zeros((n_out, n_in))
  for k in range(-1, 3):
    idx = np.clip(base + k, 0, n_in - 1).astype(int)
    np.add.at(m, (np.arange(n_out), idx), _keys_cubic(src - (base + k)))
  return m


def resize_bias_table(table, window: int) -> np.ndarray:
  """A [(2w'-1)^2, heads] relative position bias table resized to window `window`, as the official Swin
  loader does: F.interpolate(mode='bicubic') of the [heads, 2w'-1, 2w'-1] view to (2w-1, 2w-1)."""
  table = np.asarray(table, np.float64)
  rows, heads = table.shape
  side, new = math.isqrt(rows), 2 * window - 1
  m = _bicubic_matrix(side, new)
  grid = np.einsum("oi,hij,pj->hop", m, table.T.reshape(heads, side, side), m)
  return grid.reshape(heads, new * new).T.astype(np.float32)


def read_swin_state_dict(path_or_state_dict) -> tuple[dict, str]:
  """(state dict in the official layout, a name for messages) from an official release file, a plain
  state dict, or timm's layout; anything else is an error naming the file."""
  what = "the Swin state dict"
  if not isinstance(path_or_state_dict, Mapping):
    what = os.fspath(path_or_state_dict)
    if not os.path.exists(what):
      raise FileNotFoundError(f"Swin ImageNet checkpoint {what} does not exist.")
  sd = read_state_dict(path_or_state_dict)
  if isinstance(sd.get("model"), Mapping):  # official: {"model": state_dict, ...}
    sd = sd["model"]
  sd = dict(sd)
  if not any(k.startswith("patch_embed.") for k in sd):
    shown = ", ".join(sorted(map(str, sd))[:5])
    raise ValueError(f"{what} is not a Swin ImageNet checkpoint (no patch_embed.* keys; it has {shown}, ...). "
                     "A MaskFormer checkpoint converts with python -m maskformer_jax.convert.")
  merges = [int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.downsample\.", k))]
  if merges and min(merges) > 0:  # timm merges at the start of stage s + 1; the original at the end of s
    sd = {re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k): v
          for k, v in sd.items()}
  return sd, what


def _fit_tables(sd: dict, params: Mapping, what: str) -> dict:
  """Resizes the file's relative position tables of another window (same heads) to the model's."""
  resized = []
  for path, leaf in flax.traverse_util.flatten_dict(params).items():
    key = swin_key(path)[0]
    if path[-1] != "relative_position_bias_table" or key not in sd:
      continue
    table = _to_numpy(sd[key])
    if table.ndim != 2 or table.shape[1] != leaf.shape[1] or table.shape[0] == leaf.shape[0]:
      continue  # the same window, or a mismatch that convert_state_dict reports
    side = math.isqrt(table.shape[0])
    if side * side == table.shape[0] and side % 2:
      window = (math.isqrt(leaf.shape[0]) + 1) // 2
      sd[key] = resize_bias_table(table, window)
      resized.append(((side + 1) // 2, window))
  if resized:
    logging.info("%s: %d relative_position_bias_table(s) resized bicubically from window %d to %d", what,
                 len(resized), *resized[0])
  return sd


def load_swin_imagenet(path_or_state_dict, variables: Mapping) -> dict:
  """`variables` (a MaskFormer's, or a bare Swin's under `backbone`) with every Swin backbone leaf but
  the output norms norm0..norm3 replaced from an official Swin ImageNet file; the rest is unchanged."""
  sd, what = read_swin_state_dict(path_or_state_dict)
  variables = flax.core.unfreeze(variables)
  backbone = variables.get("params", {}).get("backbone")
  if not backbone or "patch_embed" not in backbone:
    raise ValueError("variables have no Swin backbone (params/backbone/patch_embed): pass the variables of a "
                     "MaskFormer with config.model.backbone='swin' (a ResNet takes config.init.torchvision_resnet).")
  kept = {k: v for k, v in backbone.items() if OUTPUT_NORM.fullmatch(k)}
  template = {k: v for k, v in backbone.items() if k not in kept}
  sd = _fit_tables(sd, template, what)
  new = convert_state_dict(sd, {"params": template}, swin_key, ignore=SWIN_DROPPED,
                           source=f"Swin ImageNet checkpoint {what}")
  dropped = collections.Counter(m.group(0).replace(".", ".*") for k in sd if (m := SWIN_DROPPED.search(k)))
  logging.info("%s: dropped %s; %s not in the file, kept at init", what,
               ", ".join(f"{n} {kind}" for kind, n in sorted(dropped.items())) or "nothing",
               ", ".join(sorted(kept)) or "nothing")
  return {**variables, "params": {**variables["params"], "backbone": {**new["params"], **kept}}}
