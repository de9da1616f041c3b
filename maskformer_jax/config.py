"""The one place where every configuration key and its original default lives.

Config files in `configs/` start from `base_config()` and override what their variant changes, so a
key that is misspelt on the command line (`--config.optim.base_lr=...`) fails loudly instead of being
ignored. Defaults are the original MaskFormer's (../shared/SPEC.md): change them only with a reason.
"""
import importlib.util
import os

import ml_collections


def load_config(path) -> ml_collections.ConfigDict:
  """`get_config()` of a config file given by path (what --config names), e.g. configs/demo.py."""
  path = os.fspath(path)
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found (expected e.g. configs/demo.py)")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 64  # global batch, over all hosts and devices
  c.total_steps = 554_400
  c.grad_accum_steps = 1  # micro-batches per step; each is batch_size // grad_accum_steps

  c.model = m = ml_collections.ConfigDict()
  m.backbone = "resnet"  # "resnet" (detectron2 layout)
  m.resnet_depth = 50  # 18/34 (basic blocks, tests only), 50, 101
  m.resnet_width = 64  # stem width; res2 has 4*width channels for bottleneck nets
  m.backbone_norm = "frozen_bn"  # "frozen_bn" (original) or "bn" (trainable BatchNorm)
  m.pixel_decoder = "base"  # "base" (FPN) or "transformer_encoder" ("+6 Enc")
  m.conv_dim = 256
  m.mask_dim = 256
  m.pixel_encoder_layers = 6  # "+6 Enc" only
  m.num_queries = 100
  m.hidden_dim = 256
  m.num_heads = 8
  m.dim_feedforward = 2048
  m.dec_layers = 6
  m.dropout = 0.1
  m.enforce_input_proj = False
  m.num_classes = 133  # K; the no-object class is index K
  m.dtype = "float32"  # compute dtype: "float32" or "bfloat16"; parameters stay float32

  c.loss = l = ml_collections.ConfigDict()
  l.class_weight = 1.0
  l.mask_weight = 20.0  # sigmoid focal
  l.dice_weight = 1.0
  l.eos_coef = 0.1  # weight of the no-object class in the cross-entropy
  l.focal_alpha = 0.25
  l.focal_gamma = 2.0
  l.deep_supervision = True
  l.point_sampling = False  # False: upsample predictions (original); True: Mask2Former points
  l.num_points = 12544
  l.oversample_ratio = 3.0
  l.importance_sample_ratio = 0.75
  l.matcher = "jax"  # "jax" (in the step) or "scipy" (host callback, for comparison only)
  l.cost_class = 1.0
  l.cost_mask = 20.0
  l.cost_dice = 1.0
  l.matcher_num_points = 0  # >0: matching costs on this many sampled points (Mask2Former)

  c.optim = o = ml_collections.ConfigDict()
  o.base_lr = 1e-4
  o.weight_decay = 1e-4
  o.backbone_multiplier = 0.1
  o.schedule = "step"  # "step" (x0.1 at decay_steps) or "poly" (power 0.9)
  o.decay_steps = (369_600,)
  o.decay_factor = 0.1
  o.poly_power = 0.9
  o.warmup_steps = 10
  o.warmup_factor = 1.0  # detectron2 WARMUP_FACTOR: the LR starts at base_lr * this (1.0: no warm-up)
  o.clip_norm = 0.01  # full-model global L2 norm
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  # Which parameters get the backbone LR multiplier / no weight decay (re.search on "a/b/kernel" paths).
  o.backbone_regex = r"^backbone/"
  o.no_decay_regex = (r"(^|/)[^/]*(bn|gn|norm)[^/]*/(scale|bias)$|/embedding$|(^|/)query_embed/"
                      r"|relative_position_bias_table|absolute_pos_embed")

  c.data = d = ml_collections.ConfigDict()
  d.dataset = "coco_panoptic"  # "coco_panoptic", "ade20k", "tfds_coco_panoptic"
  d.root = ""  # dataset root in the standard layout (local path or gs://); "" = synthetic for demo
  d.train_split = "train2017"
  d.val_split = "val2017"
  d.recipe = "coco_detr"  # "coco_detr", "lsj", "ade20k"
  d.image_size = (1024, 1024)  # static (H, W) every training example is padded/cropped to
  d.eval_size = (800, 1344)  # static (H, W) eval images are padded to (multiples of 32)
  d.eval_min_size = 800
  d.eval_max_size = 1333
  d.max_instances = 100  # M: segment slots per image
  d.num_workers = 8  # grain worker processes per host
  d.worker_buffer_size = 2
  d.bad_input = "skip"  # "skip" (count and log) or "raise"
  d.ignore_label = 255

  c.mesh = ml = ml_collections.ConfigDict()
  ml.data = -1  # -1: all devices not used by the other axes
  ml.model = 1
  ml.fsdp = False  # shard parameters and optimizer state over the data axis
  # Optional (regex, spec) pairs, first match wins, before the shape rule: re.search on the '/'-joined
  # parameter path; spec a tuple of mesh axis names or None per array axis, e.g.
  # ((r"transformer_decoder/.*/kernel$", (None, "model")),). Unmatched arrays follow the shape rule.
  ml.partition_rules = ()

  c.eval = e = ml_collections.ConfigDict()
  e.task = "panoptic"  # "panoptic", "semantic" or "instance"
  e.object_mask_threshold = 0.8
  e.overlap_threshold = 0.8
  e.batch_size = 8
  e.max_examples = -1  # -1: the whole validation split

  c.train = t = ml_collections.ConfigDict()
  t.log_every = 50
  t.eval_every = 5000
  t.checkpoint_every = 1000
  t.keep_checkpoints = 3
  t.checkpoint_timeout_s = 600  # a save (or a wait on one) taking longer stops the run with an error
  t.max_consecutive_skipped = 100  # this many non-finite steps in a row stop the run (diverged)
  t.image_summaries = 4  # predictions shown next to ground truth in TensorBoard at each eval

  c.init = i = ml_collections.ConfigDict()
  i.torchvision_resnet = ""  # path to a torchvision ResNet state dict (.pth) for the backbone
  i.checkpoint = ""  # a converted checkpoint directory (python -m maskformer_jax.convert)
  c.lock()  # a misspelt key fails instead of silently adding a new one
  return c
