"""Weight import: Hugging Face MaskFormer, torchvision ResNet, and converted checkpoints on disk.

A converted checkpoint is a directory with `variables.msgpack` (flax.serialization of
{'params', 'batch_stats'} as float32 numpy arrays) and `config.json` ({'model': our config.model
keys, 'source': where it came from}). Write one with `python -m maskformer_jax.convert --hf DIR --out
DIR`; read it with `load_converted(dir) -> (model_config_dict, variables)`.
"""
import json
import os

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from maskformer_jax.convert.hf import from_hf, model_config_from_hf
from maskformer_jax.convert.torchvision import load_torchvision_resnet

VARIABLES_FILE = "variables.msgpack"
CONFIG_FILE = "config.json"


def save_converted(out_dir, model_config: dict, variables, source: str = "") -> None:
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
  """The train state with its initial weights from config.init (a converted checkpoint, or a torchvision
  ResNet for the backbone); unchanged when neither is set."""
  if config.init.checkpoint:
    _, variables = load_converted(config.init.checkpoint)
    return merge_variables(state, variables, what=config.init.checkpoint)
  if config.init.torchvision_resnet:
    ours = jax.device_get({col: state[col] for col in ("params", "batch_stats") if state.get(col)})
    variables = load_torchvision_resnet(config.init.torchvision_resnet, ours)
    return merge_variables(state, variables, what=config.init.torchvision_resnet)
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


__all__ = ["from_hf", "model_config_from_hf", "load_torchvision_resnet", "save_converted", "load_converted",
           "load_pretrained", "merge_variables"]
