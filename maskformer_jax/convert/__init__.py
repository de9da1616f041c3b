"""Weight import: Hugging Face MaskFormer, the original's detectron2 files, torchvision ResNet, and
converted checkpoints on disk.

A converted checkpoint is a directory with `variables.msgpack` (flax.serialization of
{'params', 'batch_stats'} as float32 numpy arrays) and `config.json` ({'model': our config.model
keys, 'source': its provenance}). The provenance (`provenance`) names the source file(s) with their
sha256, the converter's version and the check the conversion passed, so a checkpoint can be traced
and re-checked. Write one with `python -m maskformer_jax.convert --hf DIR | --detectron2 FILE --config
CONFIG --out DIR`; read it with `load_converted(dir) -> (model_config_dict, variables)`.
"""
import hashlib
import importlib.metadata
import json
import os
import subprocess

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from maskformer_jax.convert.detectron2 import (D2_IGNORED, from_detectron2, normalise, read_detectron2,
                                                to_detectron2)
from maskformer_jax.convert.hf import from_hf, model_config_from_hf
from maskformer_jax.convert.swin_imagenet import load_swin_imagenet
from maskformer_jax.convert.torchvision import load_torchvision_resnet

VARIABLES_FILE = "variables.msgpack"
CONFIG_FILE = "config.json"


def sha256(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def converter_version() -> str:
  """The package version, plus the git commit (and '-dirty') when run from a checkout."""
  try:
    version = importlib.metadata.version("maskformer_jax")
  except importlib.metadata.PackageNotFoundError:
    version = "unknown"
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--", "."], capture_output=True,
                           text=True, timeout=10).stdout.strip()
    return f"maskformer_jax {version} ({commit}{'-dirty' if dirty else ''})"
  except (OSError, subprocess.SubprocessError):
    return f"maskformer_jax {version}"


def provenance(kind: str, path, check: dict) -> dict:
  """Where a conversion came from: `kind` ('hf' or 'detectron2'), the source file (or, for a
  save_pretrained directory, each file in it) with sha256, the converter's version, and `check`."""
  path = os.path.abspath(os.fspath(path))
  files = ([os.path.join(path, n) for n in sorted(os.listdir(path))] if os.path.isdir(path) else [path])
  return {"format": kind, "path": path,
          "files": {os.path.basename(f): sha256(f) for f in files if os.path.isfile(f)},
          "converter": converter_version(), "check": check}


def check_detectron2_roundtrip(state_dict, variables) -> dict:
  """Every array of the original file that we use is reproduced bit-for-bit by writing the converted
  variables back in the original's naming (so nothing was dropped, transposed wrongly or mixed up)."""
  theirs = {k: v for k, v in normalise(state_dict).items() if not D2_IGNORED.search(k)}
  ours = normalise(to_detectron2(variables))
  bad = sorted(k for k in set(theirs) | set(ours) if k not in ours or k not in theirs
               or not np.array_equal(np.asarray(theirs[k], np.float32), ours[k]))
  return {"name": "roundtrip to the original's names, bit-exact",
          "arrays": sum(1 for k in state_dict if not D2_IGNORED.search(k)),
          "mismatched": bad[:20], "passed": not bad}


def save_converted(out_dir, model_config: dict, variables, source=None) -> None:
  """Writes a converted checkpoint; `source` is its provenance (a dict from `provenance`)."""
  os.makedirs(out_dir, exist_ok=True)
  host = jax.tree.map(lambda x: np.asarray(x, np.float32), flax.core.unfreeze(variables))
  with open(os.path.join(out_dir, VARIABLES_FILE), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(host))
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump({"model": dict(model_config), "source": source}, f, indent=2, sort_keys=True)


def load_converted(ckpt_dir) -> tuple[dict, dict]:
  """(model config dict, variables) from a directory written by `save_converted` / the CLI."""
  paths = [os.path.join(ckpt_dir, n) for n in (VARIABLES_FILE, CONFIG_FILE)]
  for p in paths:
    if not os.path.exists(p):
      raise FileNotFoundError(f"{p} not found: {ckpt_dir} is not a converted checkpoint "
                              f"(write one with python -m maskformer_jax.convert --hf DIR --out DIR).")
  with open(paths[1]) as f:
    model_config = json.load(f)["model"]
  with open(paths[0], "rb") as f:
    variables = flax.serialization.msgpack_restore(f.read())
  return model_config, variables


def load_pretrained(config, state):
  """The train state with its initial weights from config.init (a converted checkpoint, or ImageNet
  weights for the backbone: a torchvision ResNet or an official Swin release file); unchanged when none
  is set."""
  if config.init.checkpoint:
    _, variables = load_converted(config.init.checkpoint)
    return merge_variables(state, variables, what=config.init.checkpoint)
  if config.init.torchvision_resnet:
    ours = jax.device_get({col: state[col] for col in ("params", "batch_stats") if state.get(col)})
    variables = load_torchvision_resnet(config.init.torchvision_resnet, ours)
    return merge_variables(state, variables, what=config.init.torchvision_resnet)
  if config.init.swin_imagenet:
    variables = load_swin_imagenet(config.init.swin_imagenet, jax.device_get({"params": state["params"]}))
    return merge_variables(state, variables, what=config.init.swin_imagenet)
  return state


def merge_variables(state, variables, *, what):
  """Replaces the matching leaves of state['params'] / state['batch_stats'], keeping each leaf's dtype
  and sharding; an entry the model lacks, or of another shape, is an error naming `what`."""
  for col in ("params", "batch_stats"):
    if col not in variables or col not in state or state[col] is None:
      continue
    ours = flax.traverse_util.flatten_dict(flax.core.unfreeze(state[col]), sep="/")
    theirs = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables[col]), sep="/")
    missing = [k for k in theirs if k not in ours]
    if missing:
      raise ValueError(f"{what}: {len(missing)} {col} entries are not in the model, e.g. {missing[:3]}")
    for k, v in theirs.items():
      if tuple(ours[k].shape) != tuple(np.shape(v)):
        raise ValueError(f"{what}: {col} {k} has shape {np.shape(v)}, the model {ours[k].shape}")
      ours[k] = jax.device_put(jnp.asarray(v, ours[k].dtype), ours[k].sharding)
    logging.info("Loaded %d of %d %s arrays from %s", len(theirs), len(ours), col, what)
    state = {**state, col: flax.traverse_util.unflatten_dict(ours, sep="/")}
  return state


__all__ = ["from_hf", "model_config_from_hf", "from_detectron2", "read_detectron2", "to_detectron2",
           "load_torchvision_resnet", "load_swin_imagenet", "save_converted", "load_converted",
           "load_pretrained", "merge_variables", "provenance", "check_detectron2_roundtrip"]
