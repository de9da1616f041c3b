"""Looking up a choice in one of the registries (plain dicts that live beside the code they choose from).

A registry maps a config value to what it names: a function, or a "module:attribute" string when the
choice is imported only if used (the TFDS source pulls in TensorFlow Datasets). Config validation
(maskformer_jax/config.py) reads the same dicts' keys, so adding a choice is one entry.
"""
import importlib


def get(table: dict, name: str, key: str):
  """table[name], resolving a lazy "module:attribute" entry; an unknown name names the config key."""
  if name not in table:
    raise ValueError(f"{key}={name!r} is not one of {sorted(table)}.")
  entry = table[name]
  if isinstance(entry, str):
    module, _, attribute = entry.partition(":")
    entry = importlib.import_module(module)
    return getattr(entry, attribute) if attribute else entry
  return entry
