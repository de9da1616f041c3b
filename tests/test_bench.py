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
