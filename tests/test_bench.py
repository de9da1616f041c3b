"""The train-step benchmark runs end to end on a tiny config (its numbers are not asserted: timing is
for benchmarks, not tests), and its synthetic batch follows the batch contract."""
import pathlib

import numpy as np
import pytest

from maskformer_jax.bench import train_step as bench

ROOT = pathlib.Path(__file__).parent.parent


def test_synthetic_batch_follows_the_contract():
  b = bench.make_batch(np.random.default_rng(0), 2, 64, 64, 8, 5)
  assert b["image"].dtype == np.uint8 and b["segments"].shape == (2, 64, 64)
  for i in range(2):
    present = set(np.unique(b["segments"][i])) - {-1}
    assert present == set(np.flatnonzero(b["valid"][i]))  # every valid slot has pixels, and only those
    assert np.all(b["labels"][i][~b["valid"][i]] == 5) and np.all(b["labels"][i][b["valid"][i]] < 5)


@pytest.mark.slow
def test_bench_runs_on_the_tiny_config(capsys):
  bench.main(["--config", f"{ROOT}/configs/coco_panoptic.py:runlocal", "--batch", "8",
              "--size", "64", "64", "--variants", "float32", "--steps", "1"])
  out = capsys.readouterr().out
  row = [l for l in out.splitlines() if l.startswith("| float32")][0]
  assert np.isfinite(float(row.split("|")[-2]))  # the loss of the timed step


def test_postprocess_bench_core_on_small_inputs(capsys):
  """The post-processing benchmark at toy size: its outputs have exactly the requested confident queries
  per image, ours equals HF where the two must agree (checked before timing), and each side gets a row."""
  from maskformer_jax.bench import postprocess
  logits, masks = postprocess.make_outputs(np.random.default_rng(0), 2, 20, 9, 6, (12, 16))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  confident = (probs.argmax(-1) < 9) & (probs.max(-1) > 0.8)
  assert confident.sum(1).tolist() == [6, 6] and masks.shape == (2, 20, 12, 16)
  assert all((masks[i, confident[i]] > 0).any(0).mean() > 0.8 for i in range(2))  # their blobs tile the image
  r = postprocess.main(["--rounds", "1", "--queries", "20", "--classes", "9", "--things", "5",
                        "--confident", "6", "--padded", "48", "64", "--orig", "30", "40", "--min-size", "48",
                        "--max-size", "64"])
  out = capsys.readouterr().out
  assert r["checked"] > 0 and r["segments"]["ours"] and "| ours |" in out and "| HF |" in out
