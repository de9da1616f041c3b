"""MaskFormer R101 "+6 Enc" on COCO panoptic: the original recipe (PQ 47.6 published)."""
import os

from maskformer_jax.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), "coco_panoptic_r50.py"))
  c.model.resnet_depth = 101
  return c
