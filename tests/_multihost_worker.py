"""One process of the 2-process train-step test (and the tests' shared config, batch and eval step).

Run as `python _multihost_worker.py PROCESS_ID PORT INIT_PICKLE OUT_JSON` with XLA_FLAGS giving 2
fake CPU devices: joins a 2-process jax.distributed job over gloo, places the given initial state
(`to_host` layout) on the global mesh, feeds this process's half of the global batch and writes the
step's metrics (process 0).
"""
import json
import pathlib
import pickle
import sys

import numpy as np

from maskformer_jax.config import load_config  # no jax import: the worker sets up jax itself

ROOT = pathlib.Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 8
# Cheaper CPU code generation for the test steps (compiling dominates these tests on a 2-core CPU).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def to_host(state):
  import jax
  return jax.device_get({**state, "rng": jax.random.key_data(state["rng"])})


def from_host(host, config, model, mesh):
  """A `to_host` state onto the mesh in its train-state layout (every process passes the same)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  from maskformer_jax import train_step
  shardings = {**train_step.state_shardings(config, model, mesh),
               "rng": NamedSharding(mesh, PartitionSpec())}
  put = lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i])  # noqa: E731
  state = jax.tree.map(put, {**host, "rng": np.asarray(host["rng"])}, shardings)
  return {**state, "rng": jax.random.wrap_key_data(state["rng"])}


def make_config(**model_overrides):
  """coco_panoptic.py:runlocal with a global batch of 8, the original's frozen BN and no dropout, so that
  every example's loss is independent of how the batch is split (over devices, processes, micro-batches)."""
  c = load_config(f"{ROOT}/configs/coco_panoptic.py:runlocal")
  c.batch_size = GLOBAL_BATCH
  c.model.dropout = 0.0
  c.model.backbone_norm = "frozen_bn"
  c.optim.base_lr = 1e-3
  c.total_steps, c.optim.decay_steps = 1000, (1000,)
  for k, v in model_overrides.items():
    c.model[k] = v
  return c


def make_batch(seed, batch_size=GLOBAL_BATCH, size=64, slots=8, num_classes=5):
  """Synthetic images: 1-3 rectangles/discs on a noisy background; the class sets the colour."""
  rng = np.random.default_rng(seed)
  colours = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 230], [230, 220, 40], [200, 60, 220]])
  image = rng.integers(90, 140, (batch_size, size, size, 3)).astype(np.uint8)
  segments = np.full((batch_size, size, size), -1, np.int32)
  labels = np.full((batch_size, slots), num_classes, np.int32)
  valid = np.zeros((batch_size, slots), bool)
  yy, xx = np.mgrid[:size, :size]
  for b in range(batch_size):
    for m in range(rng.integers(1, 4)):
      cls = rng.integers(0, num_classes)
      cy, cx, r = rng.integers(12, size - 12, 2).tolist() + [int(rng.integers(6, 12))]
      if rng.random() < 0.5:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
      else:
        mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r * 0.7)
      image[b][mask] = colours[cls]
      segments[b][mask] = m
      labels[b, m], valid[b, m] = cls, True
  for b in range(batch_size):  # a slot painted over entirely by a later shape is no target
    for m in range(slots):
      if valid[b, m] and not (segments[b] == m).any():
        valid[b, m], labels[b, m] = False, num_classes
  return {"image": image, "segments": segments, "labels": labels, "valid": valid}


def main(process_id, port, init, out):
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=process_id)
  from maskformer_jax import sharding, train_step
  from maskformer_jax.models import build_model
  assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.devices())
  c = make_config()
  model = build_model(c.model)
  mesh = sharding.make_mesh(c.mesh)
  state = from_host(pickle.loads(pathlib.Path(init).read_bytes()), c, model, mesh)
  batch = make_batch(0)
  half = GLOBAL_BATCH // 2
  local = train_step.shard_batch({k: v[process_id * half:(process_id + 1) * half]
                                  for k, v in batch.items()}, mesh)
  step = train_step.make_train_step(c, model, mesh).lower(state, local).compile(FAST_COMPILE)
  state, metrics = step(state, local)
  result = {k: float(v[0]) for k, v in metrics.items()}
  if process_id == 0:
    pathlib.Path(out).write_text(json.dumps(result))
  jax.distributed.shutdown()


def ground_truth_eval_step(num_classes):
  """An eval step that "predicts" each example's ground truth from its batch: query m is segment slot m
  (its class from `labels`, its mask from `segments` at stride 4), unused slots no-object."""
  import jax
  import jax.numpy as jnp

  @jax.jit
  def step(state, batch):
    del state
    seg = batch["segments"][:, ::4, ::4]
    slots = jnp.arange(batch["labels"].shape[1])
    masks = jnp.where(seg[:, None] == slots[None, :, None, None], 20.0, -20.0)
    classes = jnp.where(batch["valid"], batch["labels"], num_classes)
    return {"pred_logits": 20.0 * jax.nn.one_hot(classes, num_classes + 1), "pred_masks": masks}
  return step


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
