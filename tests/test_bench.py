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
def test_accelerator_bench_runs_on_the_tiny_config(tmp_path, capsys):
  """The accelerator script end to end on the CPU: one composed train-step variant (bfloat16,
  rematerialised, point-sampled losses) with its profile, the rest skipped once the budget is spent."""
  from maskformer_jax.bench import accelerator
  out = tmp_path / "accel.md"
  accelerator.main(["--out", str(out), "--config", f"{ROOT}/configs/coco_panoptic.py:runlocal", "--batch", "8",
                    "--size", "64", "64", "--variants", "bfloat16+remat+points", "float32", "--steps", "1",
                    "--profile-variant", "bfloat16+remat+points", "--budget-s", "1"])
  text = out.read_text()
  row = [line for line in text.splitlines() if line.startswith("| bfloat16+remat+points")][0]
  cells = [c.strip() for c in row.split("|")[1:-1]]
  assert np.isfinite(float(cells[-1])) and float(cells[5]) > 0 and float(cells[7]) > 0  # loss, XLA GiB, GFLOP
  assert "Costliest operations of `bfloat16+remat+points`" in text
  assert "Skipped (time budget spent): float32." in text and text.count("Skipped: the time budget") == 5
  assert "### Mask2Former train step: configs/mask2former.py" in text


def test_bench_variants_compose_and_unknown_parts_fail():
  c = bench.variant_config(bench.load_config(f"{ROOT}/configs/coco_panoptic.py:runlocal"), "bfloat16+remat+scipy")
  assert (c.model.dtype, c.model.remat, c.loss.matcher, c.loss.point_sampling) == ("bfloat16", True, "scipy", False)
  with pytest.raises(ValueError, match="unknown variant part 'fp16'.*parts: "):
    bench.variant_config(c, "fp16")
  assert bench.slices.peak_tflops("NVIDIA H200") == 989.0 and bench.slices.peak_tflops("cpu") is None


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
