"""Model cards (maskformer_jax/card.py): a conversion's and a training run's card verify, and each kind of
tampering (weights, probe outputs, source file) is named by `verify`."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import flax
import numpy as np
import pytest

from maskformer_jax import card
from maskformer_jax.convert import VARIABLES_FILE

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  from test_convert import make_hf
  from maskformer_jax.convert.__main__ import main
  base = tmp_path_factory.mktemp("card")
  hf = make_hf(depth=18, width=8, hidden=32, heads=4, queries=4, labels=2)
  hf.save_pretrained(base / "hf")
  assert main(["--hf", str(base / "hf"), "--out", str(base / "ckpt")]) == 0
  return base


def copy(converted, tmp_path):
  shutil.copytree(converted / "ckpt", tmp_path / "ckpt")
  return tmp_path / "ckpt"


def test_conversion_card_verifies(converted, capsys):
  ckpt = converted / "ckpt"
  c = card.read(ckpt)
  assert c["kind"] == "conversion" and c["provenance"]["format"] == "hf"
  assert c["provenance"]["check"]["passed"]
  assert [x["name"] for x in c["inference"]["categories"]] == ["LABEL_0", "LABEL_1"]
  assert c["probes"]["outputs"]["pred_logits"]["shape"] == [2, 4, 3]
  assert c["weights"]["modules"].keys() >= {"params/backbone", "batch_stats/backbone"}
  assert (ckpt / "CARD.md").read_text().startswith("# MaskFormer (resnet, 2 classes")
  assert card.verify(ckpt, source=converted / "hf") == []
  assert card.main(["verify", str(ckpt), "--source", str(converted / "hf" / "config.json")]) == 0
  assert "verified" in capsys.readouterr().out
  assert card.main(["show", str(ckpt)]) == 0
  assert "## Fingerprint" in capsys.readouterr().out


def test_changed_weight_is_named(converted, tmp_path, capsys):
  ckpt = copy(converted, tmp_path)
  path = ckpt / VARIABLES_FILE
  variables = flax.serialization.msgpack_restore(path.read_bytes())
  head = variables["params"]["class_embed"]
  key = sorted(head)[0]
  head[key] = np.array(head[key])
  head[key].reshape(-1)[0] += 1e-3
  path.write_bytes(flax.serialization.msgpack_serialize(variables))
  bad = card.verify(ckpt)
  assert bad and bad[0].startswith("weights:") and "params/class_embed" in bad[0], bad
  assert "params/backbone" not in bad[0]
  assert card.main(["verify", str(ckpt)]) == 1
  assert "NOT verified" in capsys.readouterr().err


def test_probe_output_past_tolerance_is_named(converted, tmp_path):
  ckpt = copy(converted, tmp_path)
  c = card.read(ckpt)
  c["probes"]["outputs"]["pred_masks"]["first"][3] += 0.01
  (ckpt / card.CARD_FILE).write_text(json.dumps(c))
  bad = card.verify(ckpt)
  assert len(bad) == 1 and bad[0].startswith("probes.outputs.pred_masks.first"), bad
  c["probes"]["outputs"]["pred_masks"]["first"][3] -= 0.01 - 5e-5  # within 1e-4: still verified
  (ckpt / card.CARD_FILE).write_text(json.dumps(c))
  assert card.verify(ckpt) == []


def test_other_source_is_named(converted, tmp_path):
  other = tmp_path / "config.json"
  text = (converted / "hf" / "config.json").read_text()
  other.write_text(text.replace('"num_labels"', '"num_labels" ', 1) if '"num_labels"' in text else text + " ")
  bad = card.verify(converted / "ckpt", source=other)
  assert len(bad) == 1 and bad[0].startswith("source: config.json sha256"), bad
  assert card.main(["verify", str(tmp_path)]) == 2  # no card: a message, not a traceback
  stranger = tmp_path / "model.bin"
  stranger.write_bytes(b"x")
  assert card.verify(converted / "ckpt", source=stranger)[0].startswith("source: model.bin is not among")


def test_training_writes_a_card_that_verifies(tmp_path):
  from maskformer_jax.data import synthetic
  data = synthetic.generate(tmp_path / "data", num_train=8, num_val=2, image_size=(64, 64), seed=0)
  workdir = tmp_path / "run"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  r = subprocess.run([sys.executable, "-m", "maskformer_jax.train",
                      f"--config={ROOT}/configs/coco_panoptic.py:runlocal", f"--workdir={workdir}",
                      f"--config.data.root={data}", "--config.total_steps=2", "--config.evals.val.every=0",
                      "--config.train.log_every=1", "--config.batch_size=2"],
                     env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  c = card.read(workdir)
  assert c["kind"] == "training"
  t = c["training"]
  assert (t["step"], t["global_batch"], t["devices"], t["processes"]) == (2, 2, 2, 1)
  assert t["mesh"] == {"data": 2, "model": 1}
  assert c["data"]["images"] == 8 and len(c["data"]["annotations"]["sha256"]) == 64
  assert len(c["inference"]["categories"]) == c["model"]["num_classes"]
  assert card.verify(workdir) == []
  assert np.load(workdir / card.PROBES_FILE)["images"].dtype == np.uint8
