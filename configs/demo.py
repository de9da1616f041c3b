"""The demo: a small MaskFormer trained from scratch on the synthetic COCO-format dataset, on a CPU.

  python -m maskformer_jax.train --config configs/demo.py --workdir runs/demo

With `data.root` empty the synthetic dataset (3 thing + 2 stuff classes, maskformer_jax/data/synthetic.py)
is generated once under $MASKFORMER_DATA or ~/.cache/maskformer_jax and reused (7 s). Generation,
compilation (~35 s), 2500 steps, evaluations every 250 steps on the full held-out split (100 images)
and the final one took about 4 minutes on the 2-core development VM and reached PQ 65.7 (things 45.1,
stuff 96.6) with the locked versions of constraints.txt (PQ 68.3 with the releases of 2026-11-26: the
synthetic images go through the installed PIL and OpenCV); the curves are in docs/benchmarks.md. For
given versions the run is deterministic: the same PQ every time.

What differs from the published recipes, and why (small data, a few thousand steps, no pretraining):
- Model: ResNet-18 layout at width 16 with trainable BatchNorm (from scratch: frozen random statistics
  would be meaningless), FPN of 64 channels, 3 decoder layers of width 64, 20 queries (the images hold at
  most 8 segments), no dropout (a few epochs of clean synthetic data do not overfit).
- Resolution 64x64: the shapes stay 4-10 pixels across at stride 4, and a step costs ~1/15 of 256x256.
- Optimizer: LR 1e-3 (10x the original; the model is 100x smaller and trains from scratch), no backbone
  multiplier (nothing pretrained to protect), linear warm-up over 100 steps from 1e-5 (factor 0.01), poly decay to 0.
  The loss is the original's: CE with no-object weight 0.1, focal x20, dice x1, deep supervision, and
  full-model gradient clipping at 0.01 (AdamW is invariant to the gradient scale, so it only matters for
  outliers).
- Augmentation: the ADE20K recipe (scale 0.5-2x, crop, flip, colour jitter) at the 64x64 canvas.
"""
from maskformer_jax.config import base_config, parse_arg


def get_config(arg=None):
  """The defaults (maskformer_jax/config.py) are the COCO recipe; only what differs is set here.
  `configs/demo.py:arch=mask2former`: the same demo with Mask2Former (see `mask2former` below);
  `configs/demo.py:arch=mask2former,task=instance`: Mask2Former on the synthetic instance annotations
  (see `instance` below)."""
  a = parse_arg(arg, arch="maskformer", task="panoptic")
  if a.arch not in ("maskformer", "mask2former"):
    raise ValueError(f"configs/demo.py: arch={a.arch!r} is not one of ['mask2former', 'maskformer'].")
  if a.task not in ("panoptic", "instance"):
    raise ValueError(f"configs/demo.py: task={a.task!r} is not one of ['instance', 'panoptic'].")
  c = base_config()
  c.batch_size = 8
  c.total_steps = 2500  # ~4.5 min on 2 idle cores; 4000 steps: PQ +1, 6 min (docs/benchmarks.md)

  m = c.model
  m.resnet_depth = 18
  m.resnet_width = 16
  m.backbone_norm = "bn"
  m.conv_dim = 64
  m.mask_dim = 64
  m.num_queries = 20
  m.hidden_dim = 64
  m.num_heads = 4
  m.dim_feedforward = 256
  m.dec_layers = 3
  m.dropout = 0.0
  m.num_classes = 5

  o = c.optim
  o.base_lr = 1e-3
  o.backbone_multiplier = 1.0
  o.schedule = "poly"
  o.decay_steps = ()
  o.warmup_steps = 100
  o.warmup_factor = 0.01  # from 1e-5

  d = c.data
  d.recipe = "ade20k"
  d.image_size = (64, 64)
  d.eval_size = (64, 64)
  d.eval_min_size = 64
  d.eval_max_size = 64
  d.max_instances = 10
  d.num_workers = 0  # decoding 64x64 images is cheaper than a worker process on 2 cores
  d.synthetic.num_train = 2000  # data.root "" (the default): this synthetic dataset, cached
  d.synthetic.num_val = 100
  d.synthetic.image_size = (64, 64)

  c.eval.batch_size = 16

  t = c.train
  t.log_every = 50
  t.checkpoint_every = 500
  t.keep_checkpoints = 2
  c.evals.val.every = 250  # ~1 s each on the 100 held-out images: the PQ-vs-time curve
  # PQ only, no mask AP evaluator (type "instance"): it would add a second pass to every evaluation, and
  # the 64x64 images hold small objects only, so APm and APl would be undefined.
  c = mask2former(c) if a.arch == "mask2former" else c
  return instance(c) if a.task == "instance" else c


def instance(c):
  """The instance variant: the same images' things as COCO instance annotations (each shape's whole
  outline, so occluded shapes overlap the ones in front; maskformer_jax/data/synthetic.py), 3 classes,
  scored by mask AP against the instance file (APm and APl undefined: every object is small at 64x64)."""
  c.data.dataset = "coco_instance"
  c.model.num_classes = 3
  c.evals.val.type = "instance"
  c.train.best_metric = "val/ap"
  return c


def mask2former(c):
  """The demo's Mask2Former: the same sizes, data and optimiser; Mask2Former's model (deformable pixel
  decoder with 2 layers of FFN 256, 6 masked-attention layers: each of the three levels twice) and its
  loss (class 2, BCE 5, dice 5, matching costs alike), on 256 points a mask: the predicted masks are
  16x16 here, so 256 points are as many as pixels (the published 12544 are ~1/5 of a 256x256 mask).
  A step costs about twice MaskFormer's, so 1250 steps fit the demo's few minutes (docs/benchmarks.md)."""
  c.total_steps = 1250
  c.evals.val.every = 125
  m = c.model
  m.arch, m.dec_layers, m.pixel_encoder_layers, m.pixel_dim_feedforward = "mask2former", 6, 2, 256
  l = c.loss
  l.mask_loss, l.class_weight, l.mask_weight, l.dice_weight = "bce", 2.0, 5.0, 5.0
  l.cost_class, l.cost_mask, l.cost_dice = 2.0, 5.0, 5.0
  l.point_sampling, l.num_points, l.matcher_num_points = True, 256, 256
  return c
