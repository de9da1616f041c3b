"""MaskFormer on ADE20K-150 semantic, 160k iterations: the original recipe, mIoU 44.5 (R50) / 45.5 (R101)
single-scale published (docs/reference.md section 5).

  --config configs/ade20k.py                  R50
  --config configs/ade20k.py:backbone=r101    R101
  --config configs/ade20k.py:runlocal         the same code paths at toy size (needs data.root)
"""
from maskformer_jax.config import base_config, parse_arg, runlocal

DEPTHS = {"r50": 50, "r101": 101}


def get_config(arg=None):
  a = parse_arg(arg, backbone="r50", runlocal=False)
  c = base_config()
  if a.backbone not in DEPTHS:
    raise ValueError(f"configs/ade20k.py: backbone={a.backbone!r} is not one of {sorted(DEPTHS)}.")
  c.model.resnet_depth = DEPTHS[a.backbone]
  c.model.num_classes = 150
  c.batch_size = 16
  c.total_steps = 160_000
  c.optim.schedule = "poly"
  c.optim.warmup_steps = 0
  d = c.data
  d.dataset = d.recipe = "ade20k"
  d.train_split, d.val_split = "training", "validation"
  d.image_size = (512, 512)
  d.eval_min_size, d.eval_max_size = 512, 2048
  d.eval_size = (512, 2048)
  d.max_instances = 150  # one target per class present in the crop (more than the 100 queries)
  c.evals.val.type = "semantic"
  c.train.best_metric = "val/miou"
  return runlocal(c) if a.runlocal else c
