"""MaskFormer on ADE20K-150 semantic, 160k iterations, the original recipes; the single-scale mIoU each
targets is the published one (docs/reference.md section 5).

  --config configs/ade20k.py                    R50                     mIoU 44.5
  --config configs/ade20k.py:backbone=r101      R101                    mIoU 45.5
  --config configs/ade20k.py:backbone=swin_t    Swin-T (IN-1K)          mIoU 46.7
  --config configs/ade20k.py:backbone=swin_s    Swin-S (IN-1K)          mIoU 49.8
  --config configs/ade20k.py:backbone=swin_b    Swin-B (IN-22K, 640)    mIoU 52.7
  --config configs/ade20k.py:backbone=swin_l    Swin-L (IN-22K, 640)    mIoU 54.1
  --config configs/ade20k.py:runlocal           the same code paths at toy size (needs data.root)
"""
from maskformer_jax.config import family, finish


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
  if a.backbone in ("swin_b", "swin_l"):  # ImageNet-22K 384 models at 640: crop, test size, max 2560
    d.image_size = (640, 640)
    d.eval_min_size, d.eval_max_size = 640, 2560
    d.eval_size = (640, 2560)
  return finish(c, a)
