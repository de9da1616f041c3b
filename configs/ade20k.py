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
from maskformer_jax.config import ade20k, family, finish


def get_config(arg=None):
  c, a = family(arg, "configs/ade20k.py")
  ade20k(c, large=a.backbone in ("swin_b", "swin_l"))
  return finish(c, a)
