"""MaskFormer R101 on ADE20K-150 semantic, 160k iterations (45.5 mIoU s.s. published)."""
import os

from maskformer_jax.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), "ade20k_r50.py"))
  c.model.resnet_depth = 101
  return c
