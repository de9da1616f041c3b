"""maskformer_jax.export: StableHLO exports of tiny models match the JAX model at two batch sizes after a
round trip through the file, as do ONNX (through onnxruntime) and TF SavedModel (through TensorFlow)
exports; what a format or converter cannot do fails with a message that says what to do."""
import json
import logging
import shutil
import sys
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskformer_jax import card as card_lib
from maskformer_jax import config as config_lib
from maskformer_jax import convert
from maskformer_jax import export
from maskformer_jax.models import MODEL_KEYS, build_model

from _multihost_worker import ROOT

SIZE = (64, 64)


def _converted(directory, pixel_decoder, family_arg="runlocal"):
  """A converted checkpoint (as python -m maskformer_jax.convert writes one) of a runlocal model at init:
  'base' is the R50-FPN model's pixel decoder, 'transformer_encoder' the "+6 Enc" one's."""
  c = config_lib.load_config(f"{ROOT}/configs/coco_panoptic.py:{family_arg}")
  c.model.pixel_decoder = pixel_decoder
  model = build_model(c.model)
  variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, *SIZE, 3)), train=False))(jax.random.key(0))
  # Non-trivial batch statistics, so that the exported normalisation layers are checked too, and every
  # parameter moved off its initial value (zero biases, unit norms), so the outputs depend on the image.
  rng = np.random.default_rng(0)
  leaves, tree = jax.tree.flatten(variables.get("batch_stats", {}))  # Swin has none
  stats = [np.abs(rng.normal(1.0, 0.2, np.shape(x))).astype(np.float32) for x in leaves]
  params = jax.tree.map(lambda x: (x + rng.normal(0, 0.05, np.shape(x))).astype(np.float32), variables["params"])
  variables = {"params": params, "batch_stats": jax.tree.unflatten(tree, stats)}
  convert.save_converted(str(directory), {k: c.model[k] for k in MODEL_KEYS}, variables)
  return directory


@pytest.fixture(scope="module")
def fpn_checkpoint(tmp_path_factory):
  return _converted(tmp_path_factory.mktemp("fpn"), "base")


def test_cli_stablehlo_fpn(fpn_checkpoint, tmp_path, capsys):
  out = tmp_path / "out"
  assert export.main(["--checkpoint", str(fpn_checkpoint), "--format", "stablehlo", "--out", str(out),
                      "--size", "64", "64", "--platforms", "cpu,cuda,tpu"]) == 0
  assert "passed" in capsys.readouterr().out
  record = json.loads((out / "export.json").read_text())
  assert record["passed"] and record["format"] == "stablehlo" and record["params"] == "constants"
  assert record["probe_batches"] == [1, 3]
  assert record["platforms"] == ["cpu", "cuda", "tpu"] and record["verified_on"] == "cpu"
  assert all(d <= 1e-4 for d in record["max_abs_diff"].values()), record
  assert record["inputs"] == [{"name": "images", "shape": ["b", 64, 64, 3], "dtype": "uint8"}]
  assert record["outputs"] == {"pred_logits": ["b", 8, 6], "pred_masks": ["b", 8, 16, 16]}
  card = json.loads((out / "card.json").read_text())
  assert card["kind"] == "export" and card["export"]["passed"] and card["weights"]["all"]
  assert card["probes"]["shape"] == [3, 64, 64, 3] and (out / "probes.npz").exists()
  assert card["probes"]["outputs"]["pred_masks"]["shape"] == [3, 8, 16, 16]
  loaded = jax.export.deserialize(bytearray((out / "model.stablehlo").read_bytes()))
  assert str(loaded.in_avals[0].shape[0]) == "b" and loaded.in_avals[0].dtype == jnp.uint8
  # The export's card verifies: the file's sha256, its outputs on the stored probes, the source weights.
  assert card_lib.verify(out, source=fpn_checkpoint) == []
  other = tmp_path / "other"  # the checkpoint with one weight changed is not the exported one
  shutil.copytree(fpn_checkpoint, other)
  variables = flax.serialization.msgpack_restore((other / convert.VARIABLES_FILE).read_bytes())
  leaf = variables["params"]["class_embed"]["bias"]
  variables["params"]["class_embed"]["bias"] = np.asarray(leaf) + 1e-3
  (other / convert.VARIABLES_FILE).write_bytes(flax.serialization.msgpack_serialize(variables))
  bad = card_lib.verify(out, source=other)
  assert len(bad) == 1 and bad[0].startswith("source: the weights of"), bad
  data = bytearray((out / "model.stablehlo").read_bytes())  # a damaged file is named, not a crash
  data[len(data) // 2] ^= 0xFF
  (out / "model.stablehlo").write_bytes(bytes(data))
  bad = card_lib.verify(out)
  assert bad and bad[0].startswith("export.sha256: model.stablehlo"), bad


def test_stablehlo_transformer_encoder_postprocess(tmp_path):
  """The "+6 Enc" pixel decoder, exported with the panoptic post-processing inside."""
  ckpt = _converted(tmp_path / "ckpt", "transformer_encoder")
  categories = tmp_path / "categories.json"
  categories.write_text(json.dumps([{"id": i + 1, "name": f"c{i}", "isthing": int(i < 3)} for i in range(5)]))
  record = export.export(ckpt, "stablehlo", tmp_path / "out", size=SIZE, postprocess=True,
                         categories=str(categories))
  assert record["passed"] and record["postprocess"], record
  assert set(record["max_abs_diff"]) == set(export.OUTPUTS + export.PANOPTIC_OUTPUTS)
  assert all(d <= 1e-4 for d in record["max_abs_diff"].values()), record
  assert record["outputs"]["panoptic"] == ["b", 64, 64] and record["outputs"]["segment_class"] == ["b", 8]
  with pytest.raises(export.ExportError, match="2 categories .*num_classes=5"):
    categories.write_text(json.dumps([{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b"}]))
    export.export(ckpt, "stablehlo", tmp_path / "out2", size=SIZE, postprocess=True, categories=str(categories))
  assert (tmp_path / "out" / "model.stablehlo").stat().st_size > 0
  record = export.export(ckpt, "onnx", tmp_path / "onnx", size=SIZE)  # the same model through ONNX
  assert record["passed"] and all(d <= 1e-4 for d in record["max_abs_diff"].values()), record


def test_onnx_fpn_with_its_batchnorms_folded(fpn_checkpoint, tmp_path, capsys):
  """ONNX through jax2onnx, run by onnxruntime. The runlocal model's trainable BatchNorms ('bn') go to
  jax2onnx folded into FrozenBatchNorm (jax2onnx mislays flax BatchNorm's layout); the check is against
  the checkpoint's own, unfolded forward."""
  out = tmp_path / "out"
  assert export.main(["--checkpoint", str(fpn_checkpoint), "--format", "onnx", "--out", str(out),
                      "--size", "64", "64"]) == 0
  assert "passed" in capsys.readouterr().out
  record = json.loads((out / "export.json").read_text())
  assert record["passed"] and record["format"] == "onnx" and record["probe_batches"] == [1, 3], record
  assert all(d <= 1e-4 for d in record["max_abs_diff"].values()), record
  assert record["inputs"][0]["dtype"] == "float32" and record["jax2onnx_version"] == "0.13.0"
  assert card_lib.verify(out, source=fpn_checkpoint) == []  # onnxruntime reruns the stored probes
  config, _, variables, _ = export.load(fpn_checkpoint)
  assert config.model.backbone_norm == "bn"
  model, folded = export.frozen_norms(config, variables)
  assert model.backbone_norm == "frozen_bn"
  stem = folded["batch_stats"]["backbone"]["stem"]["bn"]
  assert sorted(stem) == ["bias", "mean", "scale", "var"] and "bn" not in folded["params"]["backbone"]["stem"]
  np.testing.assert_array_equal(stem["scale"], variables["params"]["backbone"]["stem"]["bn"]["scale"])


@pytest.mark.slow
def test_swin_exports(tmp_path):
  """A Swin model (the runlocal Swin-T) through StableHLO and ONNX."""
  ckpt = _converted(tmp_path / "ckpt", "base", "backbone=swin_t,runlocal")
  for fmt in ("stablehlo", "onnx"):
    record = export.export(ckpt, fmt, tmp_path / fmt, size=SIZE)
    assert record["passed"] and all(d <= 1e-4 for d in record["max_abs_diff"].values()), (fmt, record)


def test_verify_catches_a_mismatch():
  forward = lambda x: {"pred_logits": x.astype(jnp.float32)[..., :1].sum((1, 2)),  # noqa: E731
                       "pred_masks": x.astype(jnp.float32).mean(-1)}
  good = export.verify(forward, lambda x: jax.device_get(forward(x)), (8, 8))
  assert good["passed"] and max(good["max_abs_diff"].values()) <= 1e-4  # jit vs eager: rounding only
  bad = export.verify(forward, lambda x: {k: v + 1e-3 for k, v in jax.device_get(forward(x)).items()}, (8, 8))
  assert not bad["passed"] and bad["max_abs_diff"]["pred_masks"] == pytest.approx(1e-3, abs=1e-4)


def test_bad_checkpoint_path(tmp_path, capsys):
  argv = ["--format", "stablehlo", "--out", str(tmp_path / "out")]
  assert export.main(["--checkpoint", str(tmp_path / "missing"), *argv]) == 1
  assert "is not a directory" in capsys.readouterr().err
  (tmp_path / "empty").mkdir()
  assert export.main(["--checkpoint", str(tmp_path / "empty"), *argv]) == 1
  err = capsys.readouterr().err
  assert "config.json not found" in err and "converted checkpoint" in err


def test_onnx_without_jax2onnx(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "jax2onnx", None)  # import fails
  with pytest.raises(export.ExportError, match="needs jax2onnx.*--format stablehlo"):
    export.export_onnx(lambda x: x, SIZE, tmp_path)


def test_onnx_conversion_failure_names_the_operation(monkeypatch, tmp_path):
  def to_onnx(*args, **kwargs):
    raise NotImplementedError("No ONNX handler for primitive 'reduce_precision'")
  monkeypatch.setitem(sys.modules, "jax2onnx", types.SimpleNamespace(to_onnx=to_onnx))
  monkeypatch.setitem(sys.modules, "onnxruntime", types.SimpleNamespace())
  monkeypatch.setattr(export.importlib.metadata, "version", lambda name: "0.0")
  with pytest.raises(export.ExportError, match="cannot convert the model: NotImplementedError: No ONNX handler "
                     "for primitive 'reduce_precision'.*use --format stablehlo"):
    export.export_onnx(lambda x: {"pred_logits": x}, SIZE, tmp_path)


def test_onnx_that_onnxruntime_refuses_is_named(monkeypatch, tmp_path):
  """jax2onnx 0.13 writes graphs with mislaid layouts; onnxruntime's refusal becomes an ExportError."""
  def session(path, providers):
    raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Node (node_Add_77) Op (Add) Incompatible dimensions")
  monkeypatch.setitem(sys.modules, "jax2onnx", types.SimpleNamespace(to_onnx=lambda *a, **k: None))
  monkeypatch.setitem(sys.modules, "onnxruntime", types.SimpleNamespace(InferenceSession=session,
                                                                        __version__="9.9"))
  monkeypatch.setattr(export.importlib.metadata, "version", lambda name: "0.0")
  with pytest.raises(export.ExportError, match="onnxruntime 9.9 cannot load: RuntimeError: .*node_Add_77.*"
                     "use --format stablehlo"):
    export.export_onnx(lambda x: {"pred_logits": x}, SIZE, tmp_path)


def test_savedmodel_fpn_with_postprocess(fpn_checkpoint, tmp_path):
  """A TF SavedModel through orbax-export (the optional 'tf' extra, installed for the suite): the
  'serving_default' signature reproduces the JAX model and its panoptic post-processing at two batch
  sizes, and its card verifies, naming a changed file."""
  out = tmp_path / "out"
  logging_before = logging.getLogger("absl").level, list(logging.getLogger().handlers)
  record = export.export(fpn_checkpoint, "savedmodel", out, size=SIZE, postprocess=True)
  # TensorFlow's saving leaves absl's logger at WARNING: the export puts it back (INFO logs stay on).
  assert (logging.getLogger("absl").level, list(logging.getLogger().handlers)) == logging_before
  assert record["passed"] and record["format"] == "savedmodel" and record["signature"] == "serving_default"
  assert all(d <= 1e-4 for d in record["max_abs_diff"].values()), record
  assert set(record["max_abs_diff"]) == {*export.OUTPUTS, *export.PANOPTIC_OUTPUTS}
  import tensorflow as tf
  serve = tf.saved_model.load(str(out / "savedmodel")).signatures["serving_default"]
  (spec,) = serve.structured_input_signature[1].values()
  assert spec.shape.as_list() == [None, *SIZE, 3] and spec.dtype == tf.uint8
  assert card_lib.verify(out, source=fpn_checkpoint) == []
  pb = out / "savedmodel" / "saved_model.pb"
  pb.write_bytes(pb.read_bytes() + b"\0")
  bad = card_lib.verify(out)
  assert bad and bad[0].startswith("export.sha256: saved_model.pb"), bad


def test_savedmodel_without_tensorflow(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # import fails
  with pytest.raises(export.ExportError, match=r"needs TensorFlow and orbax-export.*-e '\.\[tf\]' \(or use "
                     "--format stablehlo"):
    export.export_savedmodel(lambda x: x, SIZE, tmp_path)


def test_workdir_config(tmp_path):
  """A training workdir's config.json (the whole config) comes back equal, from the workdir and from a
  step directory in it; only the mesh becomes one device."""
  c = config_lib.load_config(f"{ROOT}/configs/coco_panoptic.py:runlocal")
  (tmp_path / "checkpoints" / "5").mkdir(parents=True)
  (tmp_path / "config.json").write_text(c.to_json_best_effort(indent=2))
  for where in (tmp_path, tmp_path / "checkpoints" / "5"):
    loaded = export.load_config(str(where))
    assert all(loaded[k] == c[k] for k in c if k != "mesh"), where
    assert (loaded.mesh.data, loaded.mesh.model) == (1, 1)
