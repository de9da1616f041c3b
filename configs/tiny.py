"""A tiny MaskFormer for tests: same code paths as the real configs, seconds to compile on a CPU."""
from maskformer_jax.config import base_config


def get_config():
  c = base_config()
  c.seed = 0
  c.batch_size = 4
  c.total_steps = 20
  c.model.resnet_depth = 18
  c.model.resnet_width = 16
  c.model.backbone_norm = "bn"
  c.model.conv_dim = 32
  c.model.mask_dim = 32
  c.model.num_queries = 8
  c.model.hidden_dim = 32
  c.model.num_heads = 4
  c.model.dim_feedforward = 64
  c.model.dec_layers = 2
  c.model.pixel_encoder_layers = 1
  c.model.num_classes = 5
  c.optim.warmup_steps = 0
  c.optim.decay_steps = (15,)
  c.data.image_size = (64, 64)
  c.data.eval_size = (64, 64)
  c.data.eval_min_size = 64
  c.data.eval_max_size = 64
  c.data.max_instances = 8
  c.data.num_workers = 0
  c.eval.batch_size = 4
  c.loss.num_points = 256
  c.train.log_every = 1
  c.train.eval_every = 10
  c.train.checkpoint_every = 5
  return c
