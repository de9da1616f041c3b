"""python -m maskformer_jax.convert: weights from elsewhere -> a converted checkpoint (variables.msgpack
+ config.json with provenance) for config.init.checkpoint, `predict` and `evaluate`.

  --hf DIR --out DIR                        an HF MaskFormer or Mask2Former save_pretrained directory
                                            (the model and its config are read from it)
  --detectron2 FILE --config CONFIG --out DIR an original model-zoo file (model_final_*.pkl, or a .pth the
                                            original trained); CONFIG names the model it holds, e.g.
                                            configs/coco_panoptic.py:backbone=r101

Every conversion is checked before it is written (HF: forward parity on a probe; detectron2: the file's
arrays reproduced bit-for-bit from ours) and the result is recorded. The official weights are licensed
CC BY-NC 4.0 (non-commercial); a converted copy carries the same licence.
"""
import argparse
import json
import os
import sys

import jax

from maskformer_jax import card
from maskformer_jax import config as config_lib
from maskformer_jax import paths
from maskformer_jax import visualize
from maskformer_jax.convert import (check_detectron2_roundtrip, from_detectron2, provenance, read_detectron2,
                                    save_converted)
from maskformer_jax.convert import hf as hf_maskformer
from maskformer_jax.convert import hf_mask2former
from maskformer_jax.models import MODEL_KEYS, build_model


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m maskformer_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--hf", help="directory written by save_pretrained of MaskFormerForInstanceSegmentation "
                      "or Mask2FormerForUniversalSegmentation")
  source.add_argument("--detectron2", help="the original's checkpoint (.pkl from its model zoo, or .pth)")
  parser.add_argument("--config", help="with --detectron2: the config of the model in the file "
                      "(path[:argument], as for train)")
  parser.add_argument("--out", required=True, help="output directory for variables.msgpack and config.json")
  args = parser.parse_args(argv)
  args.out = paths.absolute(args.out)
  if args.hf:
    args.hf = paths.absolute(args.hf)
    converter = hf_mask2former if hf_model_type(args.hf) == "mask2former" else hf_maskformer
    hf = converter.load_hf(args.hf)
    module, variables = converter.from_hf(hf)
    cfg = converter.model_config_from_hf(hf.config)
    check = converter.check_hf_parity(hf, module, variables)
    where = args.hf
  else:
    if not args.config:
      parser.error("--detectron2 needs --config naming the model the file holds "
                   "(e.g. configs/coco_panoptic.py:backbone=r101).")
    args.detectron2 = paths.absolute(args.detectron2)
    model = config_lib.load_config(args.config).model
    cfg = {k: model[k] for k in MODEL_KEYS}
    cfg["dtype"] = "float32"  # the stored weights; the config that loads them picks the compute dtype
    state_dict = read_detectron2(args.detectron2)
    variables = from_detectron2(state_dict, cfg)
    check = check_detectron2_roundtrip(state_dict, variables)
    where = args.detectron2
  if not check["passed"]:
    print(f"conversion check failed, nothing written: {check}", file=sys.stderr)
    return 1
  source = provenance("hf" if args.hf else "detectron2", where, check)
  save_converted(args.out, cfg, variables, source=source)
  write_card(args.out, cfg, variables, source, hf_config=hf.config if args.hf else None,
             config=None if args.hf else config_lib.load_config(args.config))
  n = sum(x.size for x in jax.tree.leaves(variables))
  print(f"wrote {args.out}: {n:,} values; check passed: {check['name']}; model config {cfg}")
  return 0


def hf_model_type(directory) -> str:
  """`model_type` of a save_pretrained directory's config.json ('maskformer', 'mask2former', ...)."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: --hf takes a directory written by save_pretrained.")
  with open(path) as f:
    return json.load(f).get("model_type", "")


def write_card(out, model_config: dict, variables, source: dict, *, hf_config=None, config=None):
  """card.json / CARD.md / probes.npz beside the converted weights (maskformer_jax.card), so the
  conversion can be re-checked later: `python -m maskformer_jax.card verify OUT --source SRC`."""
  config = config or config_lib.base_config()
  for k, v in model_config.items():
    config.model[k] = tuple(v) if isinstance(v, list) else v
  c = card.base_card(config, "conversion")
  if "unavailable" in c["data"]:  # the usual case: no dataset in the config
    c["data"] = {"note": "no dataset was read: the weights were trained on the source's data"}
  if not c["inference"]["categories"] and hf_config is not None and getattr(hf_config, "id2label", None):
    c["inference"]["categories"] = [  # names only: HF's configs carry no dataset ids nor thing/stuff flags
        {"contiguous_id": int(i), "name": str(n), "color": list(visualize.category_color({"contiguous_id": int(i)}))}
        for i, n in sorted(hf_config.id2label.items(), key=lambda t: int(t[0]))]
  c["provenance"] = source
  c, probes = card.add_fingerprint(c, config, build_model(config.model), card.variables_of(variables))
  card.write(out, c, probes)


if __name__ == "__main__":
  sys.exit(main())
