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
