"""The device mesh and where every array lives on it.

Axes ('data', 'model'). The batch is split over 'data'. Parameters (and, by the same shape rule, the
AdamW moments) are replicated by default; `mesh.fsdp` shards each big one over 'data' along its largest
divisible axis (ZeRO-3 style: XLA all-gathers them for the forward pass and reduce-scatters the
gradients); a 'model' axis > 1 shards the largest divisible axis of big kernels over 'model' too.
The rule looks only at shapes, so an array and its optimizer moments always agree.
"""
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("data", "model")
MIN_SHARD_SIZE = 2 ** 14  # arrays smaller than this stay replicated: sharding them costs more than it saves


def mesh_shape(mesh_config, num_devices):
  """(data, model) axis sizes of config.mesh over `num_devices`; a ValueError says what to change."""
  n, model = int(num_devices), int(mesh_config.model)
  if model < 1 or n % model:
    raise ValueError(f"config.mesh.model={model} does not divide the {n} devices: use a divisor of {n}.")
  data = n // model if int(mesh_config.data) == -1 else int(mesh_config.data)
  if data * model != n:
    raise ValueError(f"config.mesh.data={data} x config.mesh.model={model} = {data * model} devices, but "
                     f"{n} are available: set --config.mesh.data=-1 (all devices the model axis leaves) "
                     f"or make data*model = {n}.")
  return data, model


def make_mesh(mesh_config, devices=None):
  """A ('data', 'model') mesh over `devices` (default: all, over every process).

  mesh_config.data = -1 takes every device the model axis leaves.
  """
  devices = list(jax.devices() if devices is None else devices)
  data, model = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh((data, model), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


def batch_sharding(mesh):
  """Leading (batch) axis over 'data', the rest replicated."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh):
  return NamedSharding(mesh, P())


def check_batch_size(batch_size, mesh, what="config.batch_size"):
  data = mesh.shape["data"]
  if batch_size % data:
    raise ValueError(f"{what}={batch_size} is not divisible by the mesh data axis ({data} devices): "
                     f"use a multiple of {data}, or set --config.mesh.data / --config.mesh.model so "
                     f"that it divides the batch.")


def _largest_divisible_axis(shape, n, taken=None):
  axes = [i for i in np.argsort(shape)[::-1] if i != taken and shape[i] % n == 0 and shape[i] >= n]
  return int(axes[0]) if axes else None


def param_spec(shape, mesh, fsdp=False):
  """PartitionSpec for one parameter-like array of `shape` (rule-based, see module docstring)."""
  spec = [None] * len(shape)
  if int(np.prod(shape, dtype=np.int64)) < MIN_SHARD_SIZE:
    return P(*spec)
  model_axis = None
  if mesh.shape["model"] > 1 and len(shape) >= 2:
    model_axis = _largest_divisible_axis(shape, mesh.shape["model"])
    if model_axis is not None:
      spec[model_axis] = "model"
  if fsdp and mesh.shape["data"] > 1:
    data_axis = _largest_divisible_axis(shape, mesh.shape["data"], taken=model_axis)
    if data_axis is not None:
      spec[data_axis] = "data"
  return P(*spec)


def state_shardings(abstract_state, mesh, mesh_config):
  """NamedShardings for a state pytree of arrays/ShapeDtypeStructs (params, moments, counters)."""
  fsdp = bool(mesh_config.fsdp)
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), mesh, fsdp)),
                      abstract_state)
