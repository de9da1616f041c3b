"""The input benchmark runs, and on the way checks our targets against HF's processor."""
import pytest

from maskformer_jax.data import synthetic

pytest.importorskip("transformers")


def test_bench_input_smoke(tmp_path):
  from maskformer_jax.bench import input as bench_input
  root = synthetic.generate(tmp_path, num_train=1, num_val=3, image_size=(60, 80), seed=0)
  lines = []
  med = bench_input.run(root, "val2017", num_images=3, rounds=1, out=lines.append)
  assert set(med) == {"decode only", "coco_detr", "lsj", "ade20k", "eval", "hf"}
  assert all(v > 0 for v in med.values())
  assert any(line.startswith("| HF MaskFormerImageProcessor") for line in lines)
