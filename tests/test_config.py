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
  assert (c.loss.mask_weight, c.loss.dice_weight, c.loss.class_weight) == (20.0, 1.0, 1.0)
  assert c.batch_size % max(c.grad_accum_steps, 1) == 0


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
