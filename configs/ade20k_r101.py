"""MaskFormer R101 on ADE20K-150 semantic, 160k iterations (45.5 mIoU s.s. published)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import ade20k_r50  # noqa: E402


def get_config():
  c = ade20k_r50.get_config()
  c.model.resnet_depth = 101
  return c
