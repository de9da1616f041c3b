"""Model cards (maskformer_jax/card.py): a conversion's card verifies, and each kind of tampering (weights,
probe outputs, source file) is named by `verify`. The training run's card is checked on test_train.py's
uninterrupted run (one training run fewer in the suite)."""
import json
import shutil

import flax
import numpy as np
import pytest

from maskformer_jax import card
from maskformer_jax.convert import VARIABLES_FILE



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
  # The colours overlays draw them in (the palette's, as these categories bring none of their own).
  assert [x["color"] for x in c["inference"]["categories"]] == [[220, 20, 60], [255, 200, 0]]
  assert card.categories(ckpt) is None  # names only (HF's id2label): predict needs ids and thing flags
  assert card.categories(converted / "hf") is None  # no card there
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


def test_category_colours_are_their_own_else_the_palette():
  from maskformer_jax import visualize
  cats = [{"id": 7, "name": "a", "isthing": 1, "contiguous_id": 0, "color": [1, 2, 3]},
          {"id": 9, "name": "b", "isthing": 0, "contiguous_id": 1}]
  assert visualize.category_color(cats[0]) == (1, 2, 3)
  assert visualize.category_color(cats[1]) == tuple(visualize.PALETTE[1])
  id_map = np.array([[0, 5], [6, 6]])
  rgb = visualize.colorize(id_map, [{"id": 6, "category_id": 9, "isthing": 0},
                                    {"id": 5, "category_id": 7, "isthing": 0}], cats)
  assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 1].tolist() == [1, 2, 3]
  assert rgb[1, 0].tolist() == list(visualize.PALETTE[1])


def test_non_finite_probe_outputs_are_named():
  """A model computing NaN on the probes is said to be broken, not reported as a NaN-sized difference."""
  good = {"pred_logits": np.ones((1, 2, 3), np.float32)}
  stored = card.fingerprint(good)
  assert card.compare_outputs(stored, good, 1e-4) == []
  bad = card.compare_outputs(stored, {"pred_logits": np.full((1, 2, 3), np.nan, np.float32)}, 1e-4)
  assert bad == ["probes.outputs.pred_logits: not finite (NaN/inf) on the probe images; the model is broken"]
