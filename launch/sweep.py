"""Sweep a config over a grid of overrides, one run per TPU VM / pod slice.

  python launch/sweep.py --config configs/ade20k.py --workdir-root gs://bucket/sweeps/lr \
      --tpu my-v4-a:us-central2-b --tpu my-v4-b:us-central2-b \
      --grid optim.base_lr=1e-4,6e-5 --grid optim.weight_decay=1e-4,0.01 [--launch]

Every combination is checked against the config *before* anything starts (a misspelt key or a value of
the wrong type fails here, not an hour later on a pod), given a readable run name and its own workdir.
Without --launch the commands are printed; with it, runs go round-robin onto the TPUs listed (a TPU takes
its next run only after the previous one ends, so list as many TPUs as runs to run them all at once).
"""
import argparse
import ast
import itertools
import os
import shlex
import subprocess
import sys

from maskformer_jax.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_value(text):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string such as a path or a recipe name


def expand(grid):
  """['a.b=1,2', 'c=x'] -> [{'a.b': 1, 'c': 'x'}, {'a.b': 2, 'c': 'x'}]."""
  axes = []
  for item in grid:
    key, sep, values = item.partition("=")
    if not sep or not key or not values:
      raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. optim.base_lr=1e-4,6e-5)")
    axes.append([(key, parse_value(v)) for v in values.split(",")])
  return [dict(combo) for combo in itertools.product(*axes)]


def validate(config_path, overrides):
  """Applies the overrides to a fresh config: unknown keys and wrong types raise, naming the key."""
  config = load_config(config_path)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      if p not in node:
        raise KeyError(f"{config_path}: no config key {key!r} (no {p!r} section)")
      node = node[p]
    if leaf not in node:
      raise KeyError(f"{config_path}: no config key {key!r}; see maskformer_jax/config.py for the keys")
    try:
      setattr(node, leaf, value)
    except TypeError as e:
      raise TypeError(f"{config_path}: {key}={value!r}: {e}") from None
  return config


def run_name(overrides):
  if not overrides:
    return "base"
  return "_".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()).replace("/", "-").replace(" ", "")


def commands(config_path, workdir_root, tpus, grid):
  runs = expand(grid)
  for overrides in runs:
    validate(config_path, overrides)
  out = []
  for i, overrides in enumerate(runs):
    tpu, zone = tpus[i % len(tpus)].split(":")
    workdir = f"{workdir_root.rstrip('/')}/{run_name(overrides)}"
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    out.append([os.path.join(HERE, "tpu_vm.sh"), "train", tpu, zone, config_path, workdir, *flags])
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True)
  p.add_argument("--workdir-root", required=True)
  p.add_argument("--tpu", action="append", default=[], help="NAME:ZONE of a TPU VM (repeatable)")
  p.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... (repeatable)")
  p.add_argument("--launch", action="store_true", help="run the commands instead of printing them")
  args = p.parse_args(argv)
  if not args.tpu or any(t.count(":") != 1 for t in args.tpu):
    p.error("give at least one --tpu NAME:ZONE")
  cmds = commands(args.config, args.workdir_root, args.tpu, args.grid)
  for cmd in cmds:
    print(shlex.join(cmd))
    if args.launch:
      subprocess.run(cmd, check=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
