"""MaskFormer on ADE20K-150 semantic, 160k iterations: the original recipe, mIoU 44.5 (R50) / 45.5 (R101)
single-scale published (docs/reference.md section 5).

  --config configs/ade20k.py                  R50
  --config configs/ade20k.py:backbone=r101    R101
  --config configs/ade20k.py:runlocal         the same code paths at toy size (needs data.root)
"""
from maskformer_jax.config import family, runlocal


def get_config(arg=None):
  c, a = family(arg, "configs/ade20k.py")
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
