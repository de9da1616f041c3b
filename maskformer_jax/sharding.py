"""The device mesh and where every array lives on it.

Axes ('data', 'model'). The batch is split over 'data'; with several slices (Multislice), 'data' runs
across them and 'model' stays within each (`device_grid`). Parameters (and, by the same shape rule, the
AdamW moments) are replicated by default; `mesh.fsdp` shards each big one over 'data' along its largest
divisible axis (ZeRO-3 style: XLA all-gathers them for the forward pass and reduce-scatters the
gradients); a 'model' axis > 1 shards the largest divisible axis of big kernels over 'model' too.
The rule looks only at shapes, so an array and its optimizer moments always agree.

`mesh.partition_rules` ((regex, spec) pairs, first match wins) override the shape rule by parameter
path, e.g. to put the decoder's projections on 'model' whatever their shape. A rule is matched
against the path inside the parameter tree ('backbone/stem/conv/kernel'), also for the AdamW moments
('opt_state/1/0/mu/backbone/...' follows 'backbone/...'), so a parameter and its moments agree here too.
"""
import re

import jax
from jax.experimental import mesh_utils
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


def slice_index(device) -> int:
  """The slice a device belongs to: Multislice TPUs (several pod slices joined over the data-centre
  network, DCN) give each device a `slice_index`; everything else is one slice."""
  return int(getattr(device, "slice_index", 0) or 0)


def device_grid(mesh_config, devices, slice_of=slice_index):
  """[data, model] array of `devices` for config.mesh.

  One slice: the chips' physical topology decides the order (mesh_utils). Several slices: each slice
  is a [data / slices, model] block and the blocks stack along 'data', so the model axis stays on a
  slice's fast interconnect (ICI) and the data-parallel gradient reduction is what crosses the slower
  DCN between slices. (`mesh.fsdp` shards over the whole 'data' axis, so its parameter gathers cross
  DCN too: on several slices it trades step time for memory.)
  """
  groups = {}
  for d in devices:
    groups.setdefault(slice_of(d), []).append(d)
  slices = [groups[k] for k in sorted(groups)]
  data, model = mesh_shape(mesh_config, len(devices))
  if len(slices) == 1:
    return mesh_utils.create_device_mesh((data, model), devices, allow_split_physical_axes=True)
  per_slice = len(slices[0])
  if any(len(s) != per_slice for s in slices):
    raise ValueError(f"The {len(slices)} slices have different device counts "
                     f"({[len(s) for s in slices]}): use slices of one accelerator type and size.")
  if per_slice % model:
    raise ValueError(f"config.mesh.model={model} does not divide the {per_slice} devices of one slice "
                     f"(of {len(slices)}): the model axis stays within a slice, use a divisor of "
                     f"{per_slice}.")
  return np.concatenate([mesh_utils.create_device_mesh((per_slice // model, model), s,
                                                       allow_split_physical_axes=True)
                         for s in slices], axis=0)


def make_mesh(mesh_config, devices=None):
  """A ('data', 'model') mesh over `devices` (default: all, over every process and slice).

  mesh_config.data = -1 takes every device the model axis leaves.
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(device_grid(mesh_config, devices), AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh):
  """Leading (batch) axis over 'data', the rest replicated."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh):
  return NamedSharding(mesh, P())


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


def rules_errors(rules):
  """What is wrong with config.mesh.partition_rules on its own (no shapes needed); [] if nothing."""
  errors = []
  if isinstance(rules, (str, bytes)) or not isinstance(rules, (tuple, list)):
    return [f"config.mesh.partition_rules={rules!r} must be a tuple of (regex, spec) pairs."]
  for i, rule in enumerate(rules):
    where = f"config.mesh.partition_rules[{i}]={tuple(rule) if isinstance(rule, list) else rule!r}"
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      errors.append(f"{where} must be a (regex, spec) pair, e.g. (r'decoder/.*/kernel$', (None, 'model')).")
      continue
    pattern, spec = rule
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      errors.append(f"{where}: the pattern is not a regular expression ({e}).")
    if isinstance(spec, str) or not isinstance(spec, (tuple, list)):
      errors.append(f"{where}: the spec must be a tuple with one entry per array axis "
                    f"(a mesh axis of {AXES}, a tuple of them, or None).")
      continue
    for entry in spec:
      names = entry if isinstance(entry, (tuple, list)) else (entry,)
      bad = [n for n in names if n is not None and n not in AXES]
      if bad or (isinstance(entry, (tuple, list)) and None in names):
        errors.append(f"{where}: {entry!r} is not a mesh axis: use one of {AXES}, a tuple of them, or None.")
  return errors


def _path_str(path):
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _rule_spec(rules, name, shape, mesh):
  """(index, PartitionSpec) of the first rule matching `name`, checked against `shape`; None if none."""
  for i, (pattern, spec) in enumerate(rules):
    if not re.search(pattern, name):
      continue
    where = f"config.mesh.partition_rules[{i}]=({pattern!r}, {tuple(spec)!r}) matches {name!r} of shape {shape}"
    if len(spec) > len(shape):
      raise ValueError(f"{where}, but the spec has {len(spec)} entries for {len(shape)} axes: give at "
                       f"most one entry per axis (missing trailing entries mean replicated).")
    for axis, entry in zip(shape, spec):
      names = tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)
      size = int(np.prod([mesh.shape[n] for n in names if n is not None], dtype=np.int64))
      if axis % size:
        raise ValueError(f"{where}, but its axis of size {axis} does not divide over {entry!r} "
                         f"({size} devices): change the spec or narrow the pattern.")
    return i, P(*(tuple(e) if isinstance(e, list) else e for e in spec))
  return None


def state_shardings(abstract_state, mesh, mesh_config):
  """NamedShardings for a state pytree of arrays/ShapeDtypeStructs (params, moments, counters).

  A leaf under 'params' or 'batch_stats' is named by its path inside that collection; any other leaf
  (optimizer moments) by the longest tail of its path that names a parameter. Rules see these names.
  """
  fsdp = bool(mesh_config.fsdp)
  rules = tuple(mesh_config.get("partition_rules", ()) or ())
  errors = rules_errors(rules)
  if errors:
    raise ValueError("\n".join(errors))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
  paths = [_path_str(path).split("/") for path, _ in leaves]
  collections = ("params", "batch_stats")
  param_names = {"/".join(parts[1:]) for parts in paths if parts[0] in collections}
  used, specs = set(), []
  for parts, (_, leaf) in zip(paths, leaves):
    if parts[0] in collections:
      name = "/".join(parts[1:])
    else:  # the longest tail that names a parameter (an optimizer moment), else the full path
      tails = ("/".join(parts[j:]) for j in range(len(parts)))
      name = next((t for t in tails if t in param_names), "/".join(parts))
    shape = tuple(leaf.shape)
    hit = _rule_spec(rules, name, shape, mesh) if rules else None
    if hit is None:
      specs.append(param_spec(shape, mesh, fsdp))
    else:
      used.add(hit[0])
      specs.append(hit[1])
  unused = [f"config.mesh.partition_rules[{i}] pattern {rules[i][0]!r}" for i in range(len(rules))
            if i not in used]
  if unused:
    example = sorted(param_names)[0] if param_names else "/".join(paths[0]) if paths else ""
    raise ValueError(f"{', '.join(unused)} matches no array of the train state (rules are matched with "
                     f"re.search against paths like {example!r}): fix or remove it.")
  return jax.tree_util.tree_unflatten(treedef, [NamedSharding(mesh, s) for s in specs])
