"""MaskFormer R101 "+6 Enc" on COCO panoptic: the original recipe (PQ 47.6 published)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import coco_panoptic_r50  # noqa: E402


def get_config():
  c = coco_panoptic_r50.get_config()
  c.model.resnet_depth = 101
  return c
