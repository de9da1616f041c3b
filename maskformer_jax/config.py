"""The one place where every configuration key and its original default lives.

Config files in `configs/` start from `base_config()` and override what their variant changes, so a
key that is misspelt on the command line (`--config.optim.base_lr=...`) fails loudly instead of being
ignored. Defaults are the original MaskFormer's COCO panoptic R50 recipe (docs/reference.md section 3):
change them only with a reason. `validate()` is the one place that checks a config, cross-key
constraints included, against the registries that name every choice.
"""
import importlib.util
import math
import os

import ml_collections

from maskformer_jax import criterion
from maskformer_jax import matcher
from maskformer_jax import optim
from maskformer_jax import sharding
from maskformer_jax.data import pipeline
from maskformer_jax.data import transforms
from maskformer_jax.data.coco_panoptic import BAD_INPUT_POLICIES
from maskformer_jax.evaluation import common as evaluation
from maskformer_jax.models import ARCHS, DTYPES
from maskformer_jax.models.backbone import BACKBONES, NORMS, RESNET_STAGES
from maskformer_jax.models.msdeform import METHODS as MSDEFORM_METHODS
from maskformer_jax.models.pixel_decoder import PIXEL_DECODERS
from maskformer_jax.models.swin import SWIN_VARIANTS


def load_config(path) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file, as --config names it: "configs/coco_panoptic.py:backbone=r101".

  The part after the last ':' (if the part before it is a file) is the family's argument, as with
  ml_collections' config_flags; without one, get_config() gets its default.
  """
  path, arg = os.fspath(path), None
  head, sep, tail = path.rpartition(":")
  if sep and head.endswith(".py") and os.path.isfile(head):
    path, arg = head, tail
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found (expected e.g. configs/demo.py)")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """A family's argument "k1=v1,k2=v2" (or a bare "k1" for a boolean) over typed defaults.

  Unknown keys fail, naming the known ones; values take the type of their default.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is not one of {sorted(defaults)} (got {arg!r}).")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value, e.g. {key}={default}.")
      value = True
    elif isinstance(default, bool):
      value = value.lower() in ("1", "true", "yes")
    else:
      value = type(default)(value)
    out[key] = value
  return out


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 64  # global batch, over all hosts and devices
  c.total_steps = 554_400
  c.grad_accum_steps = 1  # micro-batches per step; each is batch_size // grad_accum_steps

  c.model = m = ml_collections.ConfigDict()
  m.arch = "maskformer"  # "maskformer" or "mask2former" (models/__init__.py ARCHS); each reads its keys below
  m.backbone = "resnet"  # "resnet" (detectron2 layout) or "swin" (models/swin.py)
  m.resnet_depth = 50  # 18/34 (basic blocks, tests only), 50, 101
  m.resnet_width = 64  # stem width; res2 has 4*width channels for bottleneck nets
  m.resnet_blocks = ()  # blocks per stage res2..res5; (): resnet_depth's (e.g. (3, 4, 6, 3) for 50)
  m.resnet_channels = ()  # output channels of res2..res5; (): resnet_depth's at resnet_width
  m.backbone_norm = "frozen_bn"  # "frozen_bn" (original) or "bn" (trainable BatchNorm); ResNet only
  # Swin (backbone "swin"; Swin-T here, the families set the published variants: models/swin.py).
  m.swin_embed_dim = 96
  m.swin_depths = (2, 2, 6, 2)
  m.swin_num_heads = (3, 6, 12, 24)
  m.swin_window_size = 7
  m.drop_path_rate = 0.3  # Swin's stochastic depth, growing linearly to this over the blocks
  m.pixel_decoder = "base"  # "base" (FPN) or "transformer_encoder" ("+6 Enc")
  m.conv_dim = 256
  m.mask_dim = 256
  m.pixel_encoder_layers = 6  # "+6 Enc", and Mask2Former's deformable encoder
  # Mask2Former's deformable-attention pixel decoder (models/msdeform.py): FFN width, sampling points per
  # head and level, and how the bilinear samples are taken ("gather"; "matmul" where gathers are slow).
  m.pixel_dim_feedforward = 1024
  m.pixel_num_points = 4
  m.msdeform_method = "gather"
  m.num_queries = 100
  m.hidden_dim = 256
  m.num_heads = 8
  m.dim_feedforward = 2048
  m.dec_layers = 6  # Mask2Former: 9 masked-attention layers
  m.dropout = 0.1  # MaskFormer's decoder (Mask2Former has none)
  m.enforce_input_proj = False
  m.num_classes = 133  # K; the no-object class is index K
  # Rematerialisation: recompute the activations of each backbone block and transformer layer in the
  # backward pass instead of keeping them (less memory, ~1 more forward of compute; docs/benchmarks.md).
  m.remat = False
  m.dtype = "float32"  # compute dtype: "float32" or "bfloat16"; parameters stay float32

  c.loss = l = ml_collections.ConfigDict()
  l.class_weight = 1.0
  l.mask_weight = 20.0  # sigmoid focal
  l.mask_loss = "focal"  # the mask term of the loss and matching cost: "focal" (MaskFormer) or "bce" (Mask2Former)
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
  d.dataset = "coco_panoptic"  # "coco_panoptic", "coco_instance", "ade20k", "tfds_coco_panoptic"
  d.root = ""  # dataset root in the standard layout (local path or gs://); "" = synthetic for demo
  d.train_split = "train2017"
  d.val_split = "val2017"
  d.recipe = "coco_detr"  # "coco_detr", "coco_detr_max1000" (Swin-L), "lsj", "ade20k"
  d.image_size = (1344, 1344)  # static (H, W) training canvas; the DETR recipe's longest edge 1333, padded
  # Evaluation and predict run each image at its test size (eval_min_size / eval_max_size, as the
  # original at batch 1) on a canvas of that size rounded up to eval_size_divisibility: one compilation
  # per distinct canvas (COCO's images, longest side 640: at most 57 at 32, 29 at 64). 0 = exactly the
  # test size, the original's COCO panoptic SIZE_DIVISIBILITY (one compilation per distinct size, up to
  # ~880 on COCO; ResNet only); a larger multiple of 32 means fewer compilations and more padding.
  # eval_buckets False: every image on the one canvas eval_size (one compilation; padding changes the
  # predictions, and images that do not fit are shrunk: counted and logged).
  d.eval_buckets = True
  d.eval_size_divisibility = 32
  d.eval_size = (800, 1344)  # static (H, W) canvas when eval_buckets is False (multiples of 32)
  d.eval_min_size = 800
  d.eval_max_size = 1333
  d.max_instances = 100  # M: segment slots per image
  d.instance_layers = 4  # coco_instance: instances one pixel may belong to (targets [H, W, L])
  d.num_workers = 8  # grain worker processes per host
  d.worker_buffer_size = 2
  d.bad_input = "skip"  # "skip" (count and log) or "raise"
  d.ignore_label = 255
  # The synthetic COCO-format dataset used when data.root == "" (generated once, then cached).
  d.synthetic = ml_collections.ConfigDict()
  d.synthetic.num_train = 1000
  d.synthetic.num_val = 100
  d.synthetic.image_size = ()  # (H, W); (): data.image_size

  c.mesh = ml = ml_collections.ConfigDict()
  ml.data = -1  # -1: all devices not used by the other axes
  ml.model = 1
  ml.fsdp = False  # shard parameters and optimizer state over the data axis
  # Optional (regex, spec) pairs, first match wins, before the shape rule: re.search on the '/'-joined
  # parameter path; spec a tuple of mesh axis names or None per array axis, e.g.
  # ((r"transformer_decoder/.*/kernel$", (None, "model")),). Unmatched arrays follow the shape rule.
  ml.partition_rules = ()

  c.eval = e = ml_collections.ConfigDict()  # inference settings every evaluator and predict share
  e.object_mask_threshold = 0.8
  e.overlap_threshold = 0.8
  e.batch_size = 8

  # Evaluators by name (big_vision's config.evals): type = a key of evaluation/common.py's EVALUATORS.
  # Metrics are written as <name>/<metric> (TensorBoard) and rows {"eval": name, ...} in metrics.jsonl.
  # A family adds one with `with c.evals.unlocked(): c.evals.other = dict(type=..., ...)`.
  c.evals = ml_collections.ConfigDict()
  c.evals.val = v = ml_collections.ConfigDict()
  v.type = "panoptic"
  v.every = 5000  # steps between evaluations while training, and at the last step; 0: never
  v.split = ""  # "": data.val_split
  v.max_examples = -1  # -1: the whole split
  v.image_summaries = 4  # predictions beside ground truth in TensorBoard

  c.train = t = ml_collections.ConfigDict()
  t.log_every = 50
  t.checkpoint_every = 1000
  t.keep_checkpoints = 3
  t.checkpoint_timeout_s = 600  # a save (or a wait on one) taking longer stops the run with an error
  t.max_consecutive_skipped = 100  # this many non-finite steps in a row stop the run (diverged)
  t.best_metric = "val/pq"  # <eval name>/<metric> the "best" checkpoint is chosen by (higher is better)

  c.init = i = ml_collections.ConfigDict()
  i.torchvision_resnet = ""  # path to a torchvision ResNet state dict (.pth) for the backbone
  i.swin_imagenet = ""  # path to an official Swin ImageNet file (.pth) for a Swin backbone
  i.checkpoint = ""  # a converted checkpoint directory (python -m maskformer_jax.convert)
  c.lock()  # a misspelt key fails instead of silently adding a new one
  return c


RESNET_BACKBONES = {"r50": 50, "r101": 101}  # a family's backbone=... argument, with SWIN_VARIANTS' keys


def family(arg, where, **more):
  """(base_config with the backbone of `arg` set, parsed arg) for a family "backbone=swin_t,runlocal"
  (`more`: the family's own arguments and their defaults); after the family's own changes,
  `finish(c, arg)` applies MaskFormer's Swin recipe and the runlocal variant."""
  a = parse_arg(arg, backbone="r50", runlocal=False, **more)
  c = base_config()
  if a.backbone in RESNET_BACKBONES:
    c.model.resnet_depth = RESNET_BACKBONES[a.backbone]
  elif a.backbone in SWIN_VARIANTS:
    c.model.backbone = "swin"
    c.model.update(SWIN_VARIANTS[a.backbone])
  else:
    raise ValueError(f"{where}: backbone={a.backbone!r} is not one of "
                     f"{sorted(RESNET_BACKBONES) + sorted(SWIN_VARIANTS)}.")
  return c, a


def ade20k(c, large: bool):
  """The ADE20K-150 semantic setting MaskFormer and Mask2Former share: batch 16, 160k steps, poly, no
  warm-up, mIoU; crops of 512 and test size 512 / 2048, or 640 / 2560 for the ImageNet-22K 384 Swin-B/L
  (`large`)."""
  c.model.num_classes = 150
  c.batch_size = 16
  c.total_steps = 160_000
  c.optim.schedule = "poly"
  c.optim.warmup_steps = 0
  d = c.data
  d.dataset = d.recipe = "ade20k"
  d.train_split, d.val_split = "training", "validation"
  size, max_size = (640, 2560) if large else (512, 2048)
  d.image_size = (size, size)
  d.eval_min_size, d.eval_max_size, d.eval_size = size, max_size, (size, max_size)
  d.max_instances = 150  # one target per class present in the crop (more than the 100 queries)
  c.evals.val.type = "semantic"
  c.train.best_metric = "val/miou"


def finish(c, a) -> ml_collections.ConfigDict:
  """The end of every family: Swin's optimiser recipe (all the original's Swin configs: AdamW 6e-5,
  weight decay 0.01, no backbone LR multiplier, 1500 linear warm-up steps from 1e-6 of the LR; no decay on
  norms and relative position tables, as for every model here), then `runlocal` if asked for."""
  if c.model.backbone == "swin" and c.model.arch == "maskformer":  # Mask2Former keeps its one recipe
    o = c.optim
    o.base_lr, o.weight_decay, o.backbone_multiplier = 6e-5, 0.01, 1.0
    o.warmup_steps, o.warmup_factor = 1500, 1e-6
  return runlocal(c) if a.runlocal else c


def runlocal(c) -> ml_collections.ConfigDict:
  """A family's "runlocal" variant: the same code paths at toy size, seconds to compile on a CPU.

  What the tests train and evaluate. A COCO-panoptic family with data.root "" uses the synthetic dataset
  (5 classes); the recipe, pixel decoder, schedule and evaluators stay the family's.
  """
  c.batch_size = 4
  c.total_steps = 20
  m = c.model
  m.resnet_depth, m.resnet_width, m.backbone_norm = 18, 16, "bn"
  m.swin_embed_dim, m.swin_depths, m.swin_num_heads, m.swin_window_size = 16, (2, 2, 2, 2), (1, 1, 2, 2), 7
  m.conv_dim = m.mask_dim = m.hidden_dim = 32
  m.num_queries, m.num_heads, m.dim_feedforward, m.dec_layers, m.pixel_encoder_layers = 8, 4, 64, 2, 1
  m.pixel_dim_feedforward, m.dtype = 64, "float32"
  if c.data.dataset == "coco_panoptic":
    m.num_classes = 5  # the synthetic dataset's 3 things + 2 stuff
  elif c.data.dataset == "coco_instance":
    m.num_classes = 3  # the synthetic dataset's instances: its 3 thing classes
  c.optim.warmup_steps = 0
  c.optim.decay_steps = (15,)
  d = c.data
  d.image_size = d.eval_size = (64, 64)
  d.eval_min_size = d.eval_max_size = 64
  d.max_instances = 8
  d.num_workers = 0
  c.eval.batch_size = 4
  c.loss.num_points = 256
  c.train.log_every = 1
  c.train.checkpoint_every = 5
  for ev in c.evals.values():
    ev.every = 10
  return c


# The choices, read from the registries beside the code they choose from.
CHOICES = {
    ("model", "arch"): ARCHS,
    ("model", "backbone"): BACKBONES,
    ("model", "backbone_norm"): NORMS,
    ("model", "pixel_decoder"): PIXEL_DECODERS,
    ("model", "dtype"): DTYPES,
    ("model", "msdeform_method"): MSDEFORM_METHODS,
    ("optim", "schedule"): optim.SCHEDULES,
    ("loss", "matcher"): matcher.MATCHERS,
    ("loss", "mask_loss"): criterion.MASK_LOSSES,
    ("data", "dataset"): pipeline.DATASETS,
    ("data", "recipe"): transforms.RECIPES,
    ("data", "bad_input"): BAD_INPUT_POLICIES,
}


def validate(config, *, num_devices: int, num_processes: int):
  """Raises ValueError listing every mistake found and what to change; returns (data, model) mesh axes.

  Everything that can be known wrong before building and compiling the model is checked here, once.
  """
  errors = []
  for (section, key), allowed in CHOICES.items():
    if config[section][key] not in allowed:
      errors.append(f"config.{section}.{key}={config[section][key]!r} is not one of {sorted(allowed)}.")
  for key in ("total_steps", "batch_size", "grad_accum_steps"):
    if int(config[key]) < 1:
      errors.append(f"config.{key}={config[key]} must be >= 1.")
  for key in ("log_every", "checkpoint_every", "keep_checkpoints", "checkpoint_timeout_s",
              "max_consecutive_skipped"):
    if int(config.train[key]) < 1:
      errors.append(f"config.train.{key}={config.train[key]} must be >= 1.")
  errors += _model_errors(config.model)
  for key in ("image_size", "eval_size"):
    size = tuple(config.data[key])
    if len(size) != 2 or any(int(s) % 32 for s in size):
      errors.append(f"config.data.{key}={size} must be (H, W) with multiples of 32 (the backbone's "
                    f"stride), e.g. {tuple(max(32, int(math.ceil(s / 32)) * 32) for s in size)}.")
  div = config.data.eval_size_divisibility
  if int(div) < 0 or int(div) % 32:
    errors.append(f"config.data.eval_size_divisibility={div} must be 0 (each image at exactly its test "
                  f"size) or a multiple of 32 (the backbone's stride), e.g. 32.")
  elif int(div) == 0 and config.data.eval_buckets and config.model.backbone == "swin":
    errors.append("config.data.eval_size_divisibility=0 evaluates at sizes that are not multiples of 32, "
                  "which the Swin backbone does not accept: use a multiple of 32 (e.g. 32).")
  errors += _evals_errors(config)

  # The mesh and the batch split over it.
  try:
    data_axis, model_axis = sharding.mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    errors.append(str(e))
    data_axis = model_axis = None
  errors += sharding.rules_errors(config.mesh.partition_rules)
  accum = max(int(config.grad_accum_steps), 1)
  if config.batch_size % accum:
    errors.append(f"config.batch_size={config.batch_size} is not divisible by "
                  f"config.grad_accum_steps={accum}.")
  micro = config.batch_size // accum
  if data_axis and micro % data_axis:
    errors.append(f"The global batch config.batch_size={config.batch_size} (per micro-batch {micro}) is "
                  f"not divisible by the {data_axis} devices of the mesh data axis: use a multiple of "
                  f"{data_axis * accum} (e.g. --config.batch_size={data_axis * accum * max(1, round(micro / data_axis))}), "
                  f"or change --config.mesh.data/--config.mesh.model.")
  if config.batch_size % num_processes:
    errors.append(f"config.batch_size={config.batch_size} is not divisible by the {num_processes} "
                  f"processes (hosts): use a multiple of {num_processes}.")
  if data_axis and config.eval.batch_size % data_axis:
    errors.append(f"config.eval.batch_size={config.eval.batch_size} is not divisible by the {data_axis} "
                  f"devices of the mesh data axis: use a multiple of {data_axis}.")
  if config.eval.batch_size % num_processes:
    errors.append(f"config.eval.batch_size={config.eval.batch_size} is not divisible by the "
                  f"{num_processes} processes: use a multiple of {num_processes}.")
  for key in ("torchvision_resnet", "swin_imagenet", "checkpoint"):
    path = config.init[key]
    if path and not path.startswith("gs://") and not os.path.exists(path):
      errors.append(f"config.init.{key}={path!r} does not exist.")
  for key, backbone, other in (("torchvision_resnet", "resnet", "swin_imagenet"),
                               ("swin_imagenet", "swin", "torchvision_resnet")):
    if config.init[key] and config.model.backbone != backbone:
      errors.append(f"config.init.{key} initialises a {backbone} backbone, not "
                    f"config.model.backbone={config.model.backbone!r}: use config.init.{other}.")
  if errors:
    raise ValueError("Configuration errors (nothing was compiled):\n  - " + "\n  - ".join(errors))
  return data_axis, model_axis


def _model_errors(m):
  errors = []
  if m.backbone == "swin":
    depths, heads = tuple(m.swin_depths), tuple(m.swin_num_heads)
    if len(depths) != 4 or len(heads) != 4 or min(depths + heads) < 1:
      errors.append(f"config.model.swin_depths={depths} and swin_num_heads={heads} must be 4 positive "
                    "numbers each (stages res2..res5).")
    elif any((m.swin_embed_dim * 2 ** s) % h for s, h in enumerate(heads)):
      errors.append(f"config.model.swin_embed_dim={m.swin_embed_dim} x 2^stage must be divisible by "
                    f"swin_num_heads={heads} in every stage.")
    if m.swin_window_size < 1 or not 0.0 <= m.drop_path_rate < 1.0:
      errors.append(f"config.model.swin_window_size={m.swin_window_size} must be >= 1 and drop_path_rate="
                    f"{m.drop_path_rate} in [0, 1).")
  if m.backbone == "resnet" and m.resnet_depth not in RESNET_STAGES:
    errors.append(f"config.model.resnet_depth={m.resnet_depth} is not one of {sorted(RESNET_STAGES)}.")
  for key in ("resnet_blocks", "resnet_channels"):
    value = tuple(m[key])
    if value and (len(value) != 4 or min(value) < 1):
      errors.append(f"config.model.{key}={value} must be () (resnet_depth's) or 4 positive numbers.")
  bottleneck = RESNET_STAGES.get(m.resnet_depth, ((), False))[1]
  if bottleneck and any(c % 4 for c in m.resnet_channels):
    errors.append(f"config.model.resnet_channels={tuple(m.resnet_channels)} must be multiples of 4 for "
                  f"bottleneck blocks (resnet_depth={m.resnet_depth}: a bottleneck is channels / 4 wide).")
  if m.conv_dim % 32:
    errors.append(f"config.model.conv_dim={m.conv_dim} must be a multiple of 32 (GroupNorm(32)).")
  if m.num_heads < 1 or m.hidden_dim % 2 or m.hidden_dim % m.num_heads or m.conv_dim % m.num_heads:
    errors.append(f"config.model.hidden_dim={m.hidden_dim} must be even, and it and conv_dim="
                  f"{m.conv_dim} divisible by num_heads={m.num_heads}.")
  for key in ("num_queries", "num_classes", "dec_layers", "pixel_num_points", "pixel_dim_feedforward"):
    if m[key] < 1:
      errors.append(f"config.model.{key}={m[key]} must be >= 1.")
  return errors


def _evals_errors(config):
  errors = []
  for name, ev in config.evals.items():
    if ev.type not in evaluation.EVALUATORS:
      errors.append(f"config.evals.{name}.type={ev.type!r} is not one of {sorted(evaluation.EVALUATORS)}.")
    elif config.data.dataset == "ade20k" and ev.type in ("panoptic", "instance"):
      errors.append(f"config.evals.{name}.type={ev.type!r} needs panoptic ground truth; the ade20k source "
                    "has semantic labels only: use type='semantic'.")
    elif config.data.dataset == "coco_instance" and ev.type != "instance":
      errors.append(f"config.evals.{name}.type={ev.type!r} needs panoptic ground truth; the coco_instance "
                    "source has instance annotations only: use type='instance'.")
    if int(ev.every) < 0:
      errors.append(f"config.evals.{name}.every={ev.every} must be >= 0 (0: not while training).")
  name, _, metric = config.train.best_metric.partition("/")
  if name not in config.evals:
    errors.append(f"config.train.best_metric={config.train.best_metric!r} names no evaluator: use "
                  f"<eval name>/<metric> with a name of config.evals ({sorted(config.evals)}).")
  elif config.evals[name].type in evaluation.EVALUATORS:
    metrics = evaluation.metric_names(config.evals[name].type)
    if metric not in metrics:
      errors.append(f"config.train.best_metric={config.train.best_metric!r}: {config.evals[name].type} "
                    f"evaluators report {', '.join(metrics)}.")
  return errors
