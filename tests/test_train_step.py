"""The train/eval steps on a mesh: one step is the same on 1 device, 8 devices, 8 devices with FSDP,
with gradient accumulation and in 2 processes; bfloat16, skipped non-finite steps, loss falling.

Compiling the tiny model's train step costs ~10-30 s on a 2-core CPU, so compiled steps and their
results are cached per (devices, fsdp, accumulation) and shared between the tests of this module.
"""
import functools
import json
import os
import pathlib
import pickle
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from _multihost_worker import FAST_COMPILE, GLOBAL_BATCH, from_host, make_batch, make_config, to_host
from maskformer_jax import optim, sharding, train_step
from maskformer_jax.models import build_model

CONFIG = make_config()
MODEL = build_model(CONFIG.model)
BATCH = make_batch(0)


def assert_trees_close(a, b, atol, what):
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


@functools.cache
def mesh_of(ndev, fsdp=False, model=1, rules=()):
  c = make_config()
  c.mesh.fsdp, c.mesh.model, c.mesh.partition_rules = fsdp, model, rules
  return c, sharding.make_mesh(c.mesh, jax.devices()[:ndev])


@functools.cache
def initial_state():
  c, mesh = mesh_of(1)
  return to_host(train_step.init_state(c, MODEL, mesh, jax.random.key(c.seed)))


def compile_step(step, state, batch):
  """The jitted step compiled with cheaper CPU codegen (tests only; the Compiled is called like it)."""
  return step.lower(state, batch).compile(FAST_COMPILE)


@functools.cache
def compiled_step(ndev, fsdp=False, accum=1, model=1, rules=()):
  c, mesh = mesh_of(ndev, fsdp, model, rules)
  c = c.copy_and_resolve_references()
  c.grad_accum_steps = accum
  state = from_host(initial_state(), c, MODEL, mesh)
  batch = train_step.shard_batch(BATCH, mesh)
  return c, mesh, compile_step(train_step.make_train_step(c, MODEL, mesh), state, batch)


@functools.cache
def one_step(ndev, fsdp=False, accum=1, model=1, rules=()):
  c, mesh, step = compiled_step(ndev, fsdp, accum, model, rules)
  state, metrics = step(from_host(initial_state(), c, MODEL, mesh), train_step.shard_batch(BATCH, mesh))
  return to_host(state), jax.device_get(metrics), state


def test_make_mesh_and_batch_errors_say_what_to_change():
  c = make_config()
  mesh = sharding.make_mesh(c.mesh)
  assert dict(mesh.shape) == {"data": 8, "model": 1}
  c.mesh.model = 2
  assert dict(sharding.make_mesh(c.mesh).shape) == {"data": 4, "model": 2}
  c.mesh.model = 3
  with pytest.raises(ValueError, match="mesh.model"):
    sharding.make_mesh(c.mesh)
  c.mesh.model, c.mesh.data = 2, 3
  with pytest.raises(ValueError, match="data"):
    sharding.make_mesh(c.mesh)
  from maskformer_jax import config as config_lib  # the batch over the mesh: checked once, up front
  c = make_config()
  c.batch_size = 12
  with pytest.raises(ValueError, match="multiple of 8"):
    config_lib.validate(c, num_devices=8, num_processes=1)
  c = make_config()
  c.grad_accum_steps = 2  # micro-batch 4 on 8 data shards
  with pytest.raises(ValueError, match="per micro-batch 4"):
    config_lib.validate(c, num_devices=8, num_processes=1)


def test_several_slices_put_data_across_and_model_within_each():
  """Multislice: 2 slices of 4 fake devices. The model axis never spans two slices, 'data' runs over
  the slices outermost, and a batch-sharded sum over the mesh is right."""
  devices = jax.devices()
  c = make_config()
  c.mesh.model = 2
  slice_of = lambda d: devices.index(d) // 4  # noqa: E731
  grid = sharding.device_grid(c.mesh, devices, slice_of=slice_of)
  assert grid.shape == (4, 2)
  assert [{slice_of(d) for d in row} for row in grid] == [{0}, {0}, {1}, {1}]
  assert sorted(d.id for d in grid.flat) == sorted(d.id for d in devices)
  mesh = jax.sharding.Mesh(grid, sharding.AXES)
  x = jax.device_put(np.arange(16.0).reshape(8, 2), sharding.batch_sharding(mesh))
  assert float(jax.jit(jnp.sum)(x)) == 120.0
  c.mesh.model = 8  # divides the 8 devices, but not the 4 of one slice
  with pytest.raises(ValueError, match="model axis stays within a slice, use a divisor of 4"):
    sharding.device_grid(c.mesh, devices, slice_of=slice_of)
  with pytest.raises(ValueError, match="different device counts"):
    sharding.device_grid(make_config().mesh, devices, slice_of=lambda d: int(devices.index(d) >= 6))
  assert sharding.slice_index(devices[0]) == 0  # CPU devices: one slice, the usual mesh
  c.mesh.model = 2
  assert dict(sharding.make_mesh(c.mesh).shape) == {"data": 4, "model": 2}


def test_partition_rules():
  c = make_config()
  c.mesh.model = 2
  mesh = sharding.make_mesh(c.mesh)  # data 4 x model 2
  assert sharding.param_spec((3, 3, 64, 128), mesh, fsdp=False) == P(None, None, None, "model")
  assert sharding.param_spec((3, 3, 64, 128), mesh, fsdp=True) == P(None, None, "data", "model")
  assert sharding.param_spec((256,), mesh, fsdp=True) == P(None)  # small: replicated
  # 257 fits no axis, so 'data' finds none left once 'model' took the 100
  assert sharding.param_spec((100, 257), mesh, fsdp=True) == P("model", None)
  assert sharding.param_spec((), mesh, fsdp=True) == P()
  data_only = sharding.make_mesh(make_config().mesh)  # data 8
  assert sharding.param_spec((96, 257), data_only, fsdp=True) == P("data", None)
  assert sharding.param_spec((96, 257), data_only, fsdp=False) == P(None, None)


DECODER_RULES = ((r"^transformer_decoder/.*/(q|k|v)_proj/kernel$", (None, "model")),
                 (r"^class_embed/kernel$", ("model", None)))


def test_regex_partition_rules_override_the_shape_rule_for_params_and_their_moments():
  c = make_config()
  c.mesh.model, c.mesh.fsdp = 2, True
  c.mesh.partition_rules = DECODER_RULES
  mesh = sharding.make_mesh(c.mesh)
  sh = train_step.state_shardings(c, MODEL, mesh)
  q = ("transformer_decoder", "layer_0", "cross_attn", "q_proj", "kernel")
  get = lambda tree, path: functools.reduce(lambda t, k: t[k], path, tree)  # noqa: E731
  adam = sh["opt_state"][1]
  for tree in (sh["params"], adam.mu, adam.nu):  # the parameter and both AdamW moments
    assert get(tree, q).spec == P(None, "model")  # 32x32: the shape rule alone would replicate it
    assert get(tree, ("class_embed", "kernel")).spec == P("model", None)
    # Unmatched arrays keep the shape rule (FSDP over 'data' and 'model' for this 3x3x128x128 kernel).
    conv = get(tree, ("backbone", "res5_1", "conv2", "kernel"))
    assert conv.spec == sharding.param_spec((3, 3, 128, 128), mesh, fsdp=True) != P()
  assert sh["step"].spec == P()
  c.mesh.partition_rules = ()
  plain = train_step.state_shardings(c, MODEL, mesh)
  assert get(plain["params"], q).spec == P(None, None)


def test_partition_rule_mistakes_are_named():
  from maskformer_jax import config as config_lib
  c = make_config()
  c.mesh.partition_rules = (("(unclosed", (None,)), (r"kernel$", ("data", "tensor")), ("x", "model"))
  with pytest.raises(ValueError) as e:
    config_lib.validate(c, num_devices=8, num_processes=1)
  for text in ("partition_rules[0]", "not a regular expression", "partition_rules[1]", "'tensor' is not a "
               "mesh axis", "partition_rules[2]", "spec must be a tuple"):
    assert text in str(e.value)
  c.mesh.model = 2
  mesh = sharding.make_mesh(c.mesh)
  c.mesh.partition_rules = ((r"^nothing/here$", (None,)),)
  with pytest.raises(ValueError, match=r"partition_rules\[0\] pattern '\^nothing/here\$' matches no array"):
    train_step.state_shardings(c, MODEL, mesh)
  c.mesh.partition_rules = ((r"^class_embed/kernel$", (None, "data")),)  # 5 classes + no-object over 4
  with pytest.raises(ValueError, match=r"class_embed/kernel' of shape \(32, 6\).*size 6 does not divide"):
    train_step.state_shardings(c, MODEL, mesh)
  c.mesh.partition_rules = ((r"^class_embed/bias$", (None, "model")),)
  with pytest.raises(ValueError, match="2 entries for 1 axes"):
    train_step.state_shardings(c, MODEL, mesh)


@pytest.mark.slow
def test_one_step_same_on_1_and_8_devices_with_and_without_fsdp():
  """Loss, gradients (AdamW's first moment is (1 - b1) * the clipped gradient) and updated
  parameters of one step agree to 1e-5 whatever the mesh (8 x 1 replicated, 8 x 1 FSDP, 4 data x 2
  model with FSDP, and 4 x 2 with regex partition rules), and FSDP / the model axis / the rules
  really shard."""
  ref, ref_metrics, _ = one_step(1)
  assert np.isfinite(ref_metrics["loss"][0]) and ref_metrics["skipped"][0] == 0
  for fsdp, model, rules in ((False, 1, ()), (True, 1, ()), (True, 2, ()), (False, 2, DECODER_RULES)):
    state, metrics, device_state = one_step(8, fsdp, 1, model, rules)
    for k in ("loss", "loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "grad_norm"):
      np.testing.assert_allclose(metrics[k][0], ref_metrics[k][0], rtol=1e-5, err_msg=k)
    mu = lambda s: s["opt_state"][1].mu  # noqa: E731  chain state: (clip, adam, ...)
    assert_trees_close(mu(state), mu(ref), 1e-7, "clipped gradient * (1 - b1)")
    assert_trees_close(state["params"], ref["params"], 1e-5, "params")
    specs = {leaf.sharding.spec for leaf in jax.tree.leaves(device_state["params"])}
    assert any("data" in spec for spec in specs) == fsdp, specs
    assert any("model" in spec for spec in specs) == (model > 1), specs
    if fsdp:
      assert any("data" in leaf.sharding.spec for leaf in jax.tree.leaves(mu(device_state)))
    if rules:
      q = device_state["params"]["transformer_decoder"]["layer_1"]["self_attn"]["k_proj"]["kernel"]
      assert q.sharding.spec == P(None, "model")


@pytest.mark.slow
def test_gradient_accumulation_equals_the_large_batch_step():
  """2 micro-batches of 4 on 4 data shards == the batch of 8 in one go (loss terms, gradients,
  parameters), because num_masks and the CE weight sum are taken over the full batch."""
  ref, ref_metrics, _ = one_step(1)
  state, metrics, _ = one_step(4, False, 2)
  for k in ("loss", "loss_ce", "loss_mask", "loss_dice", "loss_dice_0", "grad_norm", "num_masks"):
    np.testing.assert_allclose(metrics[k][0], ref_metrics[k][0], rtol=1e-5, err_msg=k)
  mu = lambda s: s["opt_state"][1].mu  # noqa: E731
  assert_trees_close(mu(state), mu(ref), 1e-7, "clipped gradient * (1 - b1)")
  assert_trees_close(state["params"], ref["params"], 1e-5, "params")


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  """2 processes x 2 fake CPU devices (jax.distributed over gloo), each feeding half of the global
  batch: the same loss as the single-process step."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  out = tmp_path / "metrics.json"
  init = tmp_path / "init.pkl"
  init.write_bytes(pickle.dumps(initial_state()))  # saves each worker compiling the init
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": str(pathlib.Path(__file__).resolve().parent.parent)}
  worker = pathlib.Path(__file__).with_name("_multihost_worker.py")
  procs = [subprocess.Popen([sys.executable, str(worker), str(i), str(port), str(init), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=600)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  multi = json.loads(out.read_text())
  _, ref_metrics, _ = one_step(1)
  for k in ("loss", "loss_mask", "loss_dice", "loss_ce", "grad_norm"):
    np.testing.assert_allclose(multi[k], ref_metrics[k][0], rtol=1e-5, err_msg=k)


@pytest.mark.slow
def test_loss_falls_on_a_few_synthetic_images_and_eval_step():
  c, mesh, step = compiled_step(1)  # also compiled for the reference step; fastest to run here
  state = from_host(initial_state(), c, MODEL, mesh)
  batch = train_step.shard_batch(BATCH, mesh)
  t0 = time.time()
  losses = []
  for _ in range(25):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"][0]))
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert np.all(np.isfinite(losses)) and int(state["skipped"]) == 0
  assert last < 0.7 * first, losses
  windows = np.asarray(losses).reshape(5, 5).mean(1)
  assert np.all(np.diff(windows) < 0), windows  # falling steadily, window after window

  print(f"25 steps in {time.time() - t0:.1f} s; losses {np.round(losses, 3).tolist()}")
  c, mesh = mesh_of(8)  # eval on 8 data shards
  state, batch = from_host(to_host(state), c, MODEL, mesh), train_step.shard_batch(BATCH, mesh)
  outputs = train_step.make_eval_step(c, MODEL, mesh)(state, batch)
  q, k = c.model.num_queries, c.model.num_classes
  assert outputs["pred_logits"].shape == (GLOBAL_BATCH, q, k + 1)
  assert outputs["pred_masks"].shape == (GLOBAL_BATCH, q, 16, 16)
  assert outputs["pred_masks"].sharding.spec[0] == "data"
  # Trained on these very images: the best query of each target predicts its class.
  probs = jax.nn.softmax(outputs["pred_logits"])
  assert float(jnp.max(probs[..., :k])) > 0.5


@pytest.mark.slow
def test_bfloat16_steps_are_finite_and_a_nan_gradient_is_skipped():
  """The tiny config's trainable BN in bfloat16 on 8 devices with FSDP: init_state
  builds the state directly sharded; steps are finite; a NaN planted in a parameter makes every
  gradient NaN: the update is skipped (params, optimizer state and BN statistics untouched) and
  counted; the next clean step trains again."""
  c = make_config(dtype="bfloat16", backbone_norm="bn")
  c.optim.warmup_steps = 10  # so that the LR of every step differs
  c.mesh.fsdp = True
  model = build_model(c.model)
  mesh = sharding.make_mesh(c.mesh)
  state = train_step.init_state(c, model, mesh, jax.random.key(1))
  assert any("data" in x.sharding.spec for x in jax.tree.leaves(state["params"]))
  batch = train_step.shard_batch(BATCH, mesh)
  step = compile_step(train_step.make_train_step(c, model, mesh), state, batch)
  before = to_host(state)
  for _ in range(2):
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"][0])) and float(metrics["skipped"][0]) == 0
  after = to_host(state)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(after["params"]))
  assert not np.allclose(after["params"]["class_embed"]["kernel"], before["params"]["class_embed"]["kernel"])
  assert not np.allclose(after["batch_stats"]["backbone"]["stem"]["bn"]["mean"],
                         before["batch_stats"]["backbone"]["stem"]["bn"]["mean"])

  planted = jax.tree.map(np.array, after)
  planted["params"]["class_embed"]["bias"][0] = np.nan
  state, metrics = step(from_host(planted, c, model, mesh), batch)
  assert float(metrics["skipped"][0]) == 1 and not np.isfinite(float(metrics["grad_norm"][0]))
  skipped = to_host(state)
  assert int(skipped["skipped"]) == 1 and int(skipped["step"]) == 3
  for key in ("params", "opt_state", "batch_stats"):
    for x, y in zip(jax.tree.leaves(skipped[key]), jax.tree.leaves(planted[key])):
      np.testing.assert_array_equal(x, y, err_msg=key)

  clean = jax.tree.map(np.array, skipped)
  clean["params"]["class_embed"]["bias"][0] = 0.0
  state, metrics = step(from_host(clean, c, model, mesh), batch)
  assert float(metrics["skipped"][0]) == 0 and int(state["skipped"]) == 1 and int(state["step"]) == 4
  # The LR schedule follows the applied updates (2 so far), as the optimizer's own count does.
  np.testing.assert_allclose(float(metrics["learning_rate"][0]), float(optim.learning_rate(c)(2)))
  assert np.all(np.isfinite(np.asarray(jax.tree.leaves(to_host(state)["params"])[0])))
