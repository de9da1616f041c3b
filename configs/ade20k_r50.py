"""MaskFormer R50 on ADE20K-150 semantic, 160k iterations: the original recipe (44.5 mIoU s.s.)."""
from maskformer_jax.config import base_config


def get_config():
  c = base_config()
  c.model.resnet_depth = 50
  c.model.pixel_decoder = "base"
  c.model.num_classes = 150
  c.batch_size = 16
  c.total_steps = 160_000
  c.optim.base_lr = 1e-4
  c.optim.weight_decay = 1e-4
  c.optim.backbone_multiplier = 0.1
  c.optim.schedule = "poly"
  c.optim.poly_power = 0.9
  c.optim.warmup_steps = 0
  c.data.dataset = "ade20k"
  c.data.recipe = "ade20k"
  c.data.train_split = "training"
  c.data.val_split = "validation"
  c.data.image_size = (512, 512)
  c.data.eval_min_size = 512
  c.data.eval_max_size = 2048
  c.data.eval_size = (512, 2048)
  c.data.max_instances = 150  # one target per class present in the crop
  c.eval.task = "semantic"
  return c
