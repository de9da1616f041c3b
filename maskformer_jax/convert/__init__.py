"""Weight import: Hugging Face MaskFormer, torchvision ResNet, and converted checkpoints on disk.

A converted checkpoint is a directory with `variables.msgpack` (flax.serialization of
{'params', 'batch_stats'} as float32 numpy arrays) and `config.json` ({'model': our config.model
keys, 'source': where it came from}). Write one with `python -m maskformer_jax.convert --hf DIR --out
DIR`; read it with `load_converted(dir) -> (model_config_dict, variables)`.
"""
import json
import os

import flax
import jax
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


__all__ = ["from_hf", "model_config_from_hf", "load_torchvision_resnet", "save_converted", "load_converted"]
