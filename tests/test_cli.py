"""Command-line plumbing and configuration errors: they must fail before compilation, saying what to do."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from maskformer_jax import config as config_lib
from maskformer_jax import convert
from maskformer_jax import metrics
from maskformer_jax import startup
from maskformer_jax import training
from maskformer_jax.data import pipeline

from _multihost_worker import ground_truth_eval_step

ROOT = pathlib.Path(__file__).parent.parent
TINY = f"{ROOT}/configs/coco_panoptic.py:runlocal"


def tiny():
  return config_lib.load_config(TINY)


def test_valid_config_passes():
  c = tiny()
  assert config_lib.validate(c, num_devices=2, num_processes=1) == (2, 1)
  c.mesh.model = 2
  assert config_lib.validate(c, num_devices=4, num_processes=2) == (2, 2)


@pytest.mark.parametrize("change, devices, processes, expected", [
    ({"batch_size": 6}, 4, 1, "--config.batch_size=8"),
    ({"batch_size": 4}, 8, 1, "not divisible by the 8 devices"),
    ({"batch_size": 6}, 2, 4, "not divisible by the 4 processes"),
    ({("mesh", "model"): 3}, 8, 1, "config.mesh.model=3 does not divide the 8 devices"),
    ({("mesh", "data"): 3}, 8, 1, "--config.mesh.data=-1"),
    ({("eval", "batch_size"): 3}, 2, 1, "config.eval.batch_size=3"),
    ({("data", "image_size"): (100, 64)}, 1, 1, "multiples of 32"),
    ({("optim", "schedule"): "cosine"}, 1, 1, "config.optim.schedule='cosine' is not one of"),
    ({("evals", "val", "type"): "panoptc"}, 1, 1, "config.evals.val.type='panoptc' is not one of"),
    ({("evals", "val", "type"): "instance"}, 1, 1, "instance evaluators report ap, ap50"),  # best_metric pq
    ({("train", "best_metric"): "test/pq"}, 1, 1, "names no evaluator"),
    ({("train", "best_metric"): "val/miou"}, 1, 1, "panoptic evaluators report pq, sq"),
    ({("data", "dataset"): "ade20k"}, 1, 1, "the ade20k source has semantic labels only"),
    ({("model", "backbone"): "vit"}, 1, 1, "config.model.backbone='vit' is not one of ['resnet', 'swin']"),
    ({("model", "resnet_depth"): 152}, 1, 1, "config.model.resnet_depth=152 is not one of"),
    ({("data", "recipe"): "lsjj"}, 1, 1, "config.data.recipe='lsjj' is not one of"),
    ({("loss", "matcher"): "greedy"}, 1, 1, "config.loss.matcher='greedy' is not one of"),
    ({"grad_accum_steps": 3}, 1, 1, "grad_accum_steps=3"),
    ({("init", "checkpoint"): "/nonexistent/ckpt"}, 1, 1, "does not exist"),
])
def test_config_errors_say_what_to_change(change, devices, processes, expected):
  c = tiny()
  for key, value in change.items():
    *parents, last = key if isinstance(key, tuple) else (key,)
    node = c
    for k in parents:
      node = node[k]
    node[last] = value
  with pytest.raises(ValueError, match="Configuration errors") as e:
    config_lib.validate(c, num_devices=devices, num_processes=processes)
  assert expected in str(e.value)


def test_all_errors_reported_at_once():
  c = tiny()
  c.batch_size = 3
  c.optim.schedule = "linear"
  with pytest.raises(ValueError) as e:
    config_lib.validate(c, num_devices=2, num_processes=1)
  assert "schedule" in str(e.value) and "batch_size=3" in str(e.value)


def test_class_count_must_match_dataset(tmp_path):
  """The one check, made where every source is built (training, evaluation, predict, data.check)."""
  from maskformer_jax.data import synthetic
  c = tiny()
  c.data.root = synthetic.generate(tmp_path / "data", num_train=2, num_val=2, image_size=(32, 32), seed=0)
  c.model.num_classes = 4
  with pytest.raises(ValueError, match="--config.model.num_classes=5"):
    pipeline.make_source(c, c.data.val_split)
  assert len(pipeline.make_source(c, c.data.val_split, check_classes=False).categories) == 5
  c.model.num_classes = 5
  assert len(pipeline.make_source(c, c.data.val_split).categories) == 5


def _run(module, *args, env=None, timeout=120):
  e = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", **(env or {}))
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT, env=e)


def test_cli_unknown_override_key_fails(tmp_path):
  r = _run("maskformer_jax.train", f"--config={TINY}", f"--workdir={tmp_path}", "--config.optim.base_lrr=1")
  assert r.returncode != 0
  assert "base_lrr" in r.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_cli_batch_not_divisible_fails_before_compiling(tmp_path):
  """With JAX_LOG_COMPILES every compilation is logged as "Compiling <name>"; the positive control shows
  that this JAX logs it, so its absence from the failed run means nothing was compiled."""
  compiles = {"JAX_LOG_COMPILES": "1"}
  control = subprocess.run([sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1.0)"],
                           capture_output=True, text=True, timeout=120, env=dict(os.environ, **compiles))
  assert "Compiling" in control.stderr, control.stderr[-2000:]
  r = _run("maskformer_jax.train", f"--config={TINY}", f"--workdir={tmp_path}", "--config.batch_size=3",
           env=compiles)
  assert r.returncode != 0
  assert "Configuration errors (nothing was compiled)" in r.stderr
  assert "config.batch_size=3" in r.stderr and "not divisible by the 2 devices" in r.stderr
  assert "Compiling" not in r.stderr and not (tmp_path / "checkpoints").exists()


def test_cli_requires_workdir():
  r = _run("maskformer_jax.train", f"--config={TINY}")
  assert r.returncode != 0 and "workdir" in r.stderr


def test_metric_writer_rows_and_resume(tmp_path):
  w = metrics.MetricWriter(str(tmp_path), enabled=True)
  for step in (1, 2, 3):
    w.write(step, {"loss": 1.0 / step, "learning_rate": 1e-4}, prefix="train")
  w.write(3, {"pq": 12.5, "sq": 70.0, "rq": 17.0}, prefix="eval")
  w.close()
  rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3, 3]
  assert rows[-1]["pq"] == 12.5 and rows[0]["loss"] == 1.0
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  # A run resumed from step 1 forgets the rows of the steps it re-does; a torn last line is dropped.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "lo')
  metrics.MetricWriter(str(tmp_path), enabled=True, resume_step=1).close()
  assert [r["step"] for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")] == [1]


def _tensorboard_values(path):
  """(tag, scalar or None, image (h, w) or None) of every summary value in a TensorBoard event file."""
  import struct
  from tensorboardX.proto import event_pb2
  data, i, out = path.read_bytes(), 0, []
  while i < len(data):
    n = struct.unpack("<Q", data[i:i + 8])[0]
    event = event_pb2.Event()
    event.ParseFromString(data[i + 12:i + 12 + n])
    i += 12 + n + 4
    for v in event.summary.value:
      image = (v.image.height, v.image.width) if v.HasField("image") else None
      out.append((v.tag, v.simple_value if image is None else None, image))
  return out


def test_tensorboard_scalars_and_images(tmp_path):
  w = metrics.MetricWriter(str(tmp_path), enabled=True)
  w.write(5, {"pq": 42.5, "note": "text is not a scalar"}, prefix="eval")
  w.images(5, "eval/image_gt_prediction", np.zeros((2, 8, 20, 3), np.uint8))
  w.close()
  (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
  values = _tensorboard_values(events)
  assert ("eval/pq", 42.5, None) in values
  assert [v for v in values if v[2]] == [("eval/image_gt_prediction/0", None, (8, 20)),
                                         ("eval/image_gt_prediction/1", None, (8, 20))]
  assert not any("note" in v[0] for v in values)


def test_disabled_writer_writes_nothing(tmp_path):
  w = metrics.MetricWriter(str(tmp_path), enabled=False)
  w.write(1, {"loss": 1.0})
  w.close()
  assert not (tmp_path / "metrics.jsonl").exists()


def test_progress_eta():
  p = metrics.Progress(total_steps=100, batch_size=8, start_step=0)
  first = p.update(10)
  assert first["eta_s"] == float("inf") and "ETA ?" in p.line(10, 2.0, first)  # compile time: no ETA
  p.first_time -= 10.0  # pretend 10 s passed for the next 10 steps
  r = p.update(20)
  assert r["eta_s"] == pytest.approx(80.0, rel=0.05)
  line = p.line(20, 1.5, r)
  assert "step 20/100" in line and "ETA 1m2" in line
  assert metrics.format_eta(3725) == "1h02m05s"


def test_evaluators_score_ground_truth_as_prediction(tmp_path):
  """The evaluators' own loop (pipeline, eval step, post-processing at the original resolution, the id
  mapping, the accumulators) fed the ground truth: every segment is recognised (RQ 100) and the stride-4
  masks overlap their originals closely (a thing a few pixels across can vanish). A wrong id space (docs/reference.md section 7) would give RQ 0."""
  from maskformer_jax import sharding
  from maskformer_jax.data import synthetic
  from maskformer_jax.evaluation import common, panoptic, semantic
  c = tiny()
  c.data.root = synthetic.generate(tmp_path / "data", num_train=2, num_val=6, image_size=(128, 128), seed=1)
  c.data.eval_size, c.data.eval_min_size, c.data.eval_max_size = (128, 128), 128, 128
  with c.evals.unlocked():
    c.evals.miou = dict(c.evals.val.to_dict(), type="semantic", image_summaries=0)
  import jax
  mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
  step = ground_truth_eval_step(c.model.num_classes)
  rows = {name: run(None, mesh, step) for name, run in common.from_config(c).items()}
  row, images = rows["val"]
  assert row["num_images"] == 6 and row["rq_th"] > 95.0 and row["rq_st"] == pytest.approx(100.0)
  assert 75.0 < row["sq"] < 100.0 and 70.0 < row["pq"] <= row["sq"]
  assert set(k for k in row if k.startswith("pq_class")) == {f"pq_class{i}" for i in (1, 2, 3, 10, 20)}
  assert images.shape[0] == c.evals.val.image_summaries and images.dtype == np.uint8
  sem, no_images = rows["miou"]
  assert 75.0 < sem["miou"] < 100.0 and sem["num_images"] == 6 and no_images is None
  assert set(panoptic.METRICS) <= set(row) and set(semantic.METRICS) <= set(sem)


def test_merge_pretrained_variables():
  import jax.numpy as jnp
  state = {"params": {"a": {"kernel": jnp.zeros((2, 3))}, "b": {"bias": jnp.zeros((3,))}},
           "batch_stats": {"a": {"mean": jnp.zeros((3,))}}, "step": jnp.zeros((), jnp.int32)}
  loaded = {"params": {"a": {"kernel": np.ones((2, 3), np.float32)}},
            "batch_stats": {"a": {"mean": np.full((3,), 2.0, np.float32)}}}
  out = convert.merge_variables(state, loaded, what="test")
  np.testing.assert_array_equal(out["params"]["a"]["kernel"], np.ones((2, 3)))
  np.testing.assert_array_equal(out["params"]["b"]["bias"], np.zeros(3))  # not in the file: kept
  np.testing.assert_array_equal(out["batch_stats"]["a"]["mean"], np.full(3, 2.0))
  with pytest.raises(ValueError, match="has shape"):
    convert.merge_variables(state, {"params": {"a": {"kernel": np.ones((3, 3))}}}, what="test")
  with pytest.raises(ValueError, match="not in the model"):
    convert.merge_variables(state, {"params": {"c": {"kernel": np.ones((3, 3))}}}, what="test")


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),  # a single-host TPU VM: nothing to initialise
    ({"TPU_WORKER_HOSTNAMES": "t1-w-0,t1-w-1"}, True),  # a pod slice
    ({"SLURM_NTASKS": "4"}, True),
    ({"SLURM_NTASKS": "1"}, False),
])
def test_multihost_detection(monkeypatch, env, expected):
  for k in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert startup.multihost_environment() is expected


def test_semantic_labels_of_a_panoptic_ground_truth(tmp_path):
  """Semantic evaluation of COCO-format data: the ground truth becomes a label map (void -> ignore)."""
  from maskformer_jax.data import synthetic
  from maskformer_jax.evaluation.semantic import semantic_labels
  c = tiny()
  c.data.root = synthetic.generate(tmp_path / "data", num_train=2, num_val=3, image_size=(64, 64), seed=2)
  source = pipeline.make_source(c, c.data.val_split)
  id_map, info = source.ground_truth(int(source.image_ids[0]))
  labels = semantic_labels(id_map, info, ignore_label=255)
  for s in info:
    assert (labels[id_map == s["id"]] == s["category_id"]).all()
  assert (labels[id_map == 0] == 255).all()
  assert semantic_labels(np.zeros((2, 2), np.int64), [], 255).tolist() == [[255, 255]] * 2


def test_divergence_counts_consecutive_skipped_steps_once_each():
  d = training.Divergence(3, start_step=10)
  m = lambda skipped: {"skipped": (np.float32(skipped), np.float32(1))}  # noqa: E731
  d.update(10, m(1))  # at or before the start (the resumed step): ignored
  d.update(11, m(1))
  d.update(11, m(1))  # the same step fed twice counts once
  d.update(12, m(1))
  d.update(13, m(0))  # a finite step resets the run
  d.update(14, m(1))
  d.update(15, m(1))
  assert d.run == 2
  with pytest.raises(training.DivergedError, match=r"3 consecutive steps \(up to step 16\)"):
    d.update(16, m(1))


def test_config_paths_made_absolute_urls_untouched(tmp_path, monkeypatch):
  from maskformer_jax import paths
  monkeypatch.chdir(tmp_path)
  c = tiny()
  c.data.root, c.init.checkpoint, c.init.torchvision_resnet = "data/coco", "", "gs://b/r50.pth"
  paths.absolute_config_paths(c)
  assert c.data.root == str(tmp_path / "data" / "coco")
  assert c.init.checkpoint == "" and c.init.torchvision_resnet == "gs://b/r50.pth"
  assert paths.absolute("~/x") == os.path.join(os.path.expanduser("~"), "x")
