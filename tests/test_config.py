import pathlib

import pytest

from maskformer_jax.config import load_config

CONFIGS = sorted(pathlib.Path(__file__).parent.parent.joinpath("configs").glob("*.py"))


load = load_config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_configs_load_and_keep_original_loss(path):
  c = load(path)
  # The original's loss weights (docs/reference.md section 2); the earlier TPU replication drifted here.
  assert c.loss.eos_coef == 0.1
  assert c.optim.clip_norm == 0.01
  if c.model.arch == "mask2former":  # docs/reference.md section 12: BCE, on points, costs alike
    assert (c.loss.mask_loss, c.loss.mask_weight, c.loss.dice_weight, c.loss.class_weight) == ("bce", 5.0, 5.0, 2.0)
    assert (c.loss.cost_mask, c.loss.cost_dice, c.loss.cost_class) == (5.0, 5.0, 2.0)
    assert c.loss.point_sampling and c.loss.matcher_num_points > 0
  else:
    assert (c.loss.mask_loss, c.loss.mask_weight, c.loss.dice_weight, c.loss.class_weight) == ("focal", 20.0, 1.0, 1.0)
  assert c.batch_size % max(c.grad_accum_steps, 1) == 0


@pytest.mark.parametrize("task", ["coco_panoptic", "coco_instance", "ade20k"])
@pytest.mark.parametrize("backbone", ["r50", "r101", "swin_t", "swin_s", "swin_b", "swin_l"])
def test_every_mask2former_variant_loads_validates_and_keeps_its_recipe(task, backbone):
  """Mask2Former's configs (docs/reference.md section 12): one optimiser for every backbone, 9 layers,
  12544 points; COCO (panoptic and instance) 50 epochs of LSJ at 1024 (Swin-L: 100 epochs, 200 queries);
  ADE20K 160k poly."""
  from maskformer_jax.config import validate
  root = pathlib.Path(__file__).parent.parent / "configs"
  c = load(f"{root}/mask2former.py:task={task},backbone={backbone}")
  validate(c, num_devices=8, num_processes=1)
  o, m, l = c.optim, c.model, c.loss
  assert (m.arch, m.dec_layers, m.num_heads, m.pixel_encoder_layers, m.pixel_dim_feedforward) == (
      "mask2former", 9, 8, 6, 1024)
  assert (m.backbone == "swin") == backbone.startswith("swin") and m.dtype == "bfloat16"
  assert (o.base_lr, o.weight_decay, o.backbone_multiplier, o.clip_norm, c.batch_size) == (1e-4, 0.05, 0.1, 0.01, 16)
  assert (l.num_points, l.matcher_num_points, l.oversample_ratio, l.importance_sample_ratio) == (12544, 12544, 3.0, 0.75)
  if task.startswith("coco"):
    long = backbone == "swin_l"
    assert (c.total_steps, tuple(o.decay_steps), m.num_queries) == (
        (737_500, (655_556, 710_184), 200) if long else (368_750, (327_778, 355_092), 100))
    assert (c.data.recipe, tuple(c.data.image_size), o.warmup_steps) == ("lsj", (1024, 1024), 10)
    if task == "coco_panoptic":
      assert m.num_classes == 133 and {ev.type for ev in c.evals.values()} == {"panoptic", "instance"}
    else:
      assert (m.num_classes, c.data.dataset, c.train.best_metric) == (80, "coco_instance", "val/ap")
      assert {ev.type for ev in c.evals.values()} == {"instance"}
  else:
    big = backbone in ("swin_b", "swin_l")
    assert (c.total_steps, o.schedule, o.warmup_steps, m.num_classes, c.evals.val.type) == (
        160_000, "poly", 0, 150, "semantic")
    assert tuple(c.data.image_size) == ((640, 640) if big else (512, 512))
  small = load(f"{root}/mask2former.py:task={task},backbone={backbone},runlocal")
  assert small.model.arch == "mask2former" and small.model.backbone == m.backbone and small.batch_size == 4
  assert small.model.dtype == "float32"
  with pytest.raises(ValueError, match="task='lvis'"):
    load(f"{root}/mask2former.py:task=lvis")


def test_unknown_key_is_an_error():
  c = load(CONFIGS[0])
  with pytest.raises(AttributeError):
    c.optim.base_lrr = 1.0  # a misspelt override must not pass silently


def test_missing_config_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.py"):
    load_config(tmp_path / "nope.py")


@pytest.mark.parametrize("family", ["coco_panoptic", "ade20k"])
@pytest.mark.parametrize("backbone", ["r50", "r101", "swin_t", "swin_s", "swin_b", "swin_l"])
def test_every_published_variant_loads_validates_and_keeps_its_recipe(family, backbone):
  """The original's configs (docs/reference.md section 3): Swin models with their own optimiser recipe,
  COCO Swin with the FPN and an enforced projection, ADE20K Swin-B/L at 640."""
  from maskformer_jax.config import validate
  from maskformer_jax.models.swin import SWIN_VARIANTS
  root = pathlib.Path(__file__).parent.parent / "configs"
  c = load(f"{root}/{family}.py:backbone={backbone}")
  validate(c, num_devices=8, num_processes=1)
  o, m = c.optim, c.model
  if backbone.startswith("swin"):
    assert m.backbone == "swin" and {k: m[k] for k in SWIN_VARIANTS[backbone]} == SWIN_VARIANTS[backbone]
    assert (o.base_lr, o.weight_decay, o.backbone_multiplier, o.warmup_steps, o.warmup_factor) == (
        6e-5, 0.01, 1.0, 1500, 1e-6)
    assert m.drop_path_rate == 0.3
  else:
    assert m.backbone == "resnet" and m.resnet_depth == int(backbone[1:])
    assert (o.base_lr, o.weight_decay, o.backbone_multiplier) == (1e-4, 1e-4, 0.1)
    assert o.warmup_steps == (10 if family == "coco_panoptic" else 0)
  if family == "coco_panoptic":
    swin = backbone.startswith("swin")
    assert (m.pixel_decoder, m.enforce_input_proj) == (("base", True) if swin else ("transformer_encoder", False))
    # Swin-L alone trains with the longest side <= 1000 (MAX_SIZE_TRAIN), on a canvas that fits it.
    assert (c.data.recipe, tuple(c.data.image_size)) == (
        ("coco_detr_max1000", (1024, 1024)) if backbone == "swin_l" else ("coco_detr", (1344, 1344)))
  else:
    big = backbone in ("swin_b", "swin_l")
    assert tuple(c.data.image_size) == ((640, 640) if big else (512, 512))
    assert c.data.eval_max_size == (2560 if big else 2048)
  # runlocal shrinks the same family without losing its backbone kind.
  small = load(f"{root}/{family}.py:backbone={backbone},runlocal")
  assert small.model.backbone == m.backbone and small.batch_size == 4


def test_unknown_backbone_names_the_choices():
  with pytest.raises(ValueError, match=r"backbone='swin_x'.*'r101'.*'swin_l'"):
    load(pathlib.Path(__file__).parent.parent / "configs" / "coco_panoptic.py:backbone=swin_x")
