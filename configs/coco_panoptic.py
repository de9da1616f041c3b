"""MaskFormer "+6 Enc" on COCO panoptic (133 classes): the original recipe, PQ 46.5 (R50) / 47.6 (R101)
published (docs/reference.md section 5).

  --config configs/coco_panoptic.py                  R50
  --config configs/coco_panoptic.py:backbone=r101    R101
  --config configs/coco_panoptic.py:runlocal         the same code paths at toy size (tests)

maskformer_jax/config.py's defaults are this recipe (batch 64, 554,400 steps, x0.1 at 369,600, the DETR
augmentation at a 1344 canvas, PQ evaluation); this file states only what differs.
"""
from maskformer_jax.config import family, runlocal


def get_config(arg=None):
  c, a = family(arg, "configs/coco_panoptic.py")
  c.model.pixel_decoder = "transformer_encoder"
  return runlocal(c) if a.runlocal else c
