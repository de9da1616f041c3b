"""MaskFormer R50 "+6 Enc" on COCO panoptic: the original recipe (PQ 46.5 published)."""
from maskformer_jax.config import base_config


def get_config():
  c = base_config()
  c.model.resnet_depth = 50
  c.model.pixel_decoder = "transformer_encoder"
  c.model.num_classes = 133
  c.batch_size = 64
  c.total_steps = 554_400
  c.optim.base_lr = 1e-4
  c.optim.weight_decay = 1e-4
  c.optim.backbone_multiplier = 0.1
  c.optim.schedule = "step"
  c.optim.decay_steps = (369_600,)
  c.optim.warmup_steps = 10
  c.data.dataset = "coco_panoptic"
  c.data.recipe = "coco_detr"
  c.data.image_size = (1344, 1344)  # DETR recipe: shortest edge <= 800, longest <= 1333, padded
  c.eval.object_mask_threshold = 0.8
  c.eval.overlap_threshold = 0.8
  return c
