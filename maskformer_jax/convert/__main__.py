"""python -m maskformer_jax.convert --hf DIR --out DIR: an HF MaskFormer save_pretrained directory ->
a converted checkpoint (variables.msgpack + config.json) for config.init.checkpoint."""
import argparse
import sys

import jax

from maskformer_jax import paths
from maskformer_jax.convert import from_hf, model_config_from_hf, save_converted
from maskformer_jax.convert.hf import load_hf


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m maskformer_jax.convert", description=__doc__)
  parser.add_argument("--hf", required=True, help="directory written by MaskFormerForInstanceSegmentation.save_pretrained")
  parser.add_argument("--out", required=True, help="output directory for variables.msgpack and config.json")
  args = parser.parse_args(argv)
  args.hf, args.out = paths.absolute(args.hf), paths.absolute(args.out)
  hf = load_hf(args.hf)
  _, variables = from_hf(hf)
  cfg = model_config_from_hf(hf.config)
  save_converted(args.out, cfg, variables, source=f"hf:{args.hf}")
  n = sum(x.size for x in jax.tree.leaves(variables))
  print(f"wrote {args.out}: {n:,} values; model config {cfg}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
