"""User-given local paths made absolute once, at the command-line boundary; URLs (gs://...) untouched.

Why: orbax (0.12 and newer) refuses relative checkpoint paths, and a relative path changes meaning as
soon as a library, a worker process or a notebook runs from another directory. Every command resolves
the paths it is given here, against the directory it was started from, before anything else sees them.
"""
import os

# Config keys that hold paths (data.root is also the TFDS data_dir).
CONFIG_PATHS = (("data", "root"), ("init", "checkpoint"), ("init", "torchvision_resnet"), ("init", "swin_imagenet"))


def is_remote(path) -> bool:
  """gs://, s3://, ... : resolved by the storage library, never by the local file system."""
  return "://" in os.fspath(path)


def absolute(path):
  """`path` as an absolute local path ('~' expanded); '' and URLs are returned unchanged."""
  path = os.fspath(path)
  if not path or is_remote(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def absolute_config_paths(config):
  """Makes every path-valued key of `config` (CONFIG_PATHS) absolute, in place; returns config."""
  for section, key in CONFIG_PATHS:
    if section in config and key in config[section]:
      config[section][key] = absolute(config[section][key])
  return config
