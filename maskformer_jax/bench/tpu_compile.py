"""Will it fit? Compiles a config's train and eval steps for a TPU slice with the real TPU compiler, on any
host (a laptop CPU will do: libtpu from PyPI compiles for slices it cannot run), and reports what each
device needs.

  python -m maskformer_jax.bench.tpu_compile --config configs/coco_panoptic.py --topology v4-8 \
      [--config.grad_accum_steps=2] [--batch 64] [--num-slices 2] [--steps train,eval] [--json out.json] \
      [--no-search]

--topology is a Cloud TPU accelerator type (v4-8, v4-32, v5e-16 = v5litepod-16, v5p-8, v6e-8) or a compiler
topology (v5e:2x2, v4:2x2x1); v4 and v5p compile for one device per chip (megacore), as their VMs run.
Any config family and `--config.KEY=VALUE` override is taken, as by `maskformer_jax.train`.

For each step: compile time; per-device bytes (arguments, outputs, temporaries, code) against the HBM
the compiler itself says the chip has, and whether it fits; the largest temporaries; FLOPs per device
per step and per image; the HLO's size; the collectives by kind and bytes; the step time to expect at
40% of the chip's bfloat16 peak (what a first run on hardware is compared against). When the train step
does not fit, the gradient accumulation, rematerialisation, FSDP or larger slice that does is found by
compiling those variants (nothing is guessed); --no-search skips that. `launch/tpu.py` and
`launch/sweep.py` run this as their pre-flight. Measured tables: docs/benchmarks.md, "Will it fit?".

Needs libtpu: `pip install -e '.[tpu]'` (the test extra has it too).
"""
import os

# Before JAX starts its backends: compile-only use of libtpu needs no TPU, no metadata server and no
# exclusive lock (so several compilations, pytest workers included, can run at once), and host work stays
# on the CPU (on a TPU VM, a training run may hold the chips). These only affect this process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import collections  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from maskformer_jax import config as config_lib  # noqa: E402
from maskformer_jax import sharding  # noqa: E402
from maskformer_jax import slices as slices_lib  # noqa: E402
from maskformer_jax import train_step as train_step_lib  # noqa: E402
from maskformer_jax.data import transforms  # noqa: E402
from maskformer_jax.models import build_model  # noqa: E402

GIB = 2 ** 30
UTILISATION = slices_lib.UTILISATION
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


class NoTpuCompiler(RuntimeError):
  """libtpu is not installed (or cannot start), so nothing can be compiled for a TPU here."""


def topology_devices(slice_):
  """The devices of `slice_` as the TPU compiler sees them (compile-only: nothing runs on them)."""
  from jax.experimental import topologies
  shape3 = tuple(slice_.shape) + (1,) * (3 - len(slice_.shape))
  kwargs = {"chip_config_name": "megacore" if slice_.chip.megacore else "default",
            "chips_per_host_bounds": tuple(min(s, b) for s, b in zip(shape3, (2, 2, 1)))}
  if slice_.num_slices > 1:
    kwargs["num_slices"] = slice_.num_slices
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", slice_.accelerator_type)  # quiets libtpu's start-up
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=slice_.topology, **kwargs).devices
  except Exception as e:  # noqa: BLE001  (jax raises several kinds, all meaning "no TPU compiler here")
    if "libtpu" in str(e).lower() or "tpu" in type(e).__name__.lower() or isinstance(e, (RuntimeError, ValueError)):
      raise NoTpuCompiler(
          f"cannot compile for TPU {slice_} here ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
          f"install libtpu with `pip install -e '.[tpu]'` (it pins jax[tpu]=={jax.__version__})") from e
    raise


@functools.lru_cache(maxsize=None)
def hbm_bytes(generation: str) -> int:
  """The HBM one device of `generation` has for a program, as the TPU compiler counts it: compiles a
  program that cannot fit and reads the capacity from its refusal (v5e 15.75 GiB of its 16)."""
  slice_ = slices_lib.parse(f"{slices_lib.CHIPS[generation].topology_prefix}:"
                            + "x".join(["1"] * slices_lib.CHIPS[generation].dims))
  device = topology_devices(slice_)[0]
  s = jax.sharding.SingleDeviceSharding(device)
  too_big = jax.ShapeDtypeStruct((2 ** 40,), jnp.uint8, sharding=s)
  try:
    jax.jit(lambda x: x + 1, out_shardings=s).lower(too_big).compile()
  except Exception as e:  # noqa: BLE001
    capacity = oom_capacity(str(e))
    if capacity:
      return capacity
    raise
  raise RuntimeError(f"a 1 TiB program compiled for {generation}: cannot read its HBM capacity")


def _gib_text(value: str, unit: str) -> int:
  scale = {"K": 2 ** 10, "M": 2 ** 20, "G": GIB, "T": 2 ** 40}.get(unit.upper()[:1], 1)
  return int(float(value) * scale)


def oom_capacity(message: str):
  """The available HBM bytes a RESOURCE_EXHAUSTED message names, or None."""
  m = re.search(r"exceeds available HBM \(([\d.]+)([KMGT]?)\)", message) or \
      re.search(r"of ([\d.]+)([KMGT]) hbm", message)
  return _gib_text(*m.groups()) if m else None


def oom_required(message: str):
  """The bytes a RESOURCE_EXHAUSTED message says the program needs, or None."""
  m = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)", message) or \
      re.search(r"Used ([\d.]+)([KMGT]) of", message)
  return _gib_text(*m.groups()) if m else None


def abstract_batch(config, batch_size, canvas, mesh):
  """ShapeDtypeStructs of a global batch in the batch contract (the data pipeline's own padding example,
  so the keys, dtypes and segment layers are the loader's), laid out over the mesh's 'data' axis."""
  layers = int(config.data.instance_layers) if config.data.dataset == "coco_instance" else 0
  example = transforms.padding_example(canvas, config.data.max_instances, config.model.num_classes, layers)
  s = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((batch_size, *np.shape(v)), np.asarray(v).dtype, sharding=s)
          for k, v in example.items()}


def abstract_state(config, model, mesh):
  shardings = train_step_lib.state_shardings(config, model, mesh)
  shapes = jax.eval_shape(train_step_lib.init_fn(config, model), jax.random.key(0))
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
  return state, shardings


def collectives(hlo_text):
  """{kind: {"count", "bytes"}} of the collectives in an optimised HLO module (asynchronous pairs counted
  once, at their start; bytes = the result each device receives). The TPU compiler fuses a reduce-scatter
  into a fusion that calls an `all-reduce-scatter` computation: counted as a reduce-scatter. Ops inside
  loops count once."""
  out = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
  op = re.compile(r"=\s+(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
  fused = re.compile(r"=\s+(\(?[^=]*?\)?)\s+fusion\(.*calls=%all-reduce-scatter")
  for line in hlo_text.splitlines():
    line = re.sub(r"/\*.*?\*/", "", line)  # long tuples carry /*index=5*/ comments
    m = op.search(line)
    kind = m and m.group(2)
    if not m:
      m = fused.search(line)
      kind = m and "reduce-scatter"
    if not m:
      continue
    shapes = [_shape_bytes(d, dims) for d, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1))]
    if kind != "reduce-scatter" and m.group(3) and len(shapes) > 1:  # an async start: (operands, results)
      shapes = shapes[len(shapes) // 2:]
    out[kind]["count"] += 1
    out[kind]["bytes"] += sum(shapes)
  return dict(out)


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}


def _shape_bytes(dtype, dims):
  return _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)


def largest_temporaries(dump_dir, n=8):
  """[(bytes, shape, op)] of the largest values in the program's temporary HBM buffer, from XLA's buffer
  assignment (values that are never alive together share bytes there, so these do not add up to the
  temporaries' total); `op` is the JAX operation that made each (its op_name)."""
  def newest(suffix):
    files = [os.path.join(root, f) for root, _, names in os.walk(dump_dir) for f in names if f.endswith(suffix)]
    return max(files, key=os.path.getsize) if files else None

  assignment, hlo = newest("after_optimizations-buffer-assignment.txt"), newest("after_optimizations.txt")
  if not assignment:
    return []
  op_names = {}
  if hlo:
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", open(hlo).read(), re.M):
      op_names[m.group(1)] = m.group(2)
  values, in_temp = {}, False
  for line in open(assignment):
    if line.startswith("allocation "):  # HBM temporaries: "preallocated-temp" in the default memory space
      in_temp = "preallocated-temp" in line and "color" not in line
      continue
    m = in_temp and re.match(r"\s*value: <\d+ ([\w.\-]+)(?:\{[^}]*\})? @\d+> \(size=(\d+),offset=\d+\): (.*)$", line)
    if m and not m.group(3).startswith("(") and int(m.group(2)) > values.get(m.group(1), (0,))[0]:  # arrays
      shape = re.sub(r"\{[^{}]*\}", "", re.sub(r"/\*.*?\*/", "", m.group(3)))[:100]
      values[m.group(1)] = (int(m.group(2)), shape, op_names.get(m.group(1), m.group(1)))
  return sorted(values.values(), key=lambda v: -v[0])[:n]


@dataclasses.dataclass
class StepReport:
  step: str  # "train" or "eval"
  config: str
  slice: str
  topology: str
  num_slices: int
  devices: int
  global_batch: int
  canvas: tuple
  settings: dict  # the config values that decide memory: dtype, remat, grad_accum_steps, mesh
  fits: bool
  per_device_bytes: int  # arguments + outputs - donated aliases + temporaries + code (refused: what the
  # compiler reported when it gave up, a lower bound)
  hbm_bytes: int
  compile_s: float
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  flops_per_device: float = float("nan")
  flops_per_image: float = float("nan")
  hlo_instructions: int = 0
  collectives: dict = dataclasses.field(default_factory=dict)
  largest_temporaries: list = dataclasses.field(default_factory=list)
  step_s_at_40pct: float = float("nan")
  error: str = ""

  def to_json(self):
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in dataclasses.asdict(self).items()}


# The config keys that decide the compiled steps' shapes and memory; the others (learning rates, schedules,
# paths, evaluation periods) are numbers inside the same program or not in it at all. A pre-flight result
# holds for every config that agrees on these (launch/tpu.py caches by them).
PROGRAM_KEYS = ("batch_size", "grad_accum_steps", "model", "loss", "mesh", "data.image_size",
                "data.max_instances", "data.dataset", "data.instance_layers", "data.eval_size", "eval.batch_size")


def program_config(config) -> dict:
  """{key: value} of PROGRAM_KEYS in `config` (sections as plain dicts)."""
  out = {}
  for key in PROGRAM_KEYS:
    node = config
    for part in key.split("."):
      node = node[part]
    out[key] = node.to_dict() if hasattr(node, "to_dict") else node
  return out


def settings_of(config):
  return {"model.dtype": config.model.dtype, "model.remat": bool(config.model.remat),
          "grad_accum_steps": int(config.grad_accum_steps), "mesh.fsdp": bool(config.mesh.fsdp),
          "mesh.model": int(config.mesh.model), "loss.point_sampling": bool(config.loss.point_sampling)}


def compile_step(config, slice_, which="train", *, config_name="", dump=True):
  """Compiles one step of `config` for `slice_`: a StepReport (fits False with the compiler's own numbers
  when it refuses for memory)."""
  devices = topology_devices(slice_)
  processes = len({d.process_index for d in devices})
  checked = config.copy_and_resolve_references()
  for key in checked.init:  # weights to start from need not be on this machine (they change no shape)
    checked.init[key] = ""
  config_lib.validate(checked, num_devices=len(devices), num_processes=processes)
  mesh = sharding.make_mesh(config.mesh, devices)
  model = build_model(config.model)
  state, shardings = abstract_state(config, model, mesh)
  if which == "train":
    batch_size, canvas = int(config.batch_size), tuple(config.data.image_size)
    fn = train_step_lib.make_train_step(config, model, mesh, shardings)
  else:
    batch_size, canvas = int(config.eval.batch_size), tuple(config.data.eval_size)
    fn = train_step_lib.make_eval_step(config, model, mesh, shardings)
  batch = abstract_batch(config, batch_size, canvas, mesh)
  report = StepReport(which, config_name, str(slice_), slice_.topology, slice_.num_slices, len(devices),
                      batch_size, canvas, settings_of(config), False, 0, hbm_bytes(slice_.chip.generation),
                      0.0)
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as dump_dir:
    try:
      lowered = fn.lower(state, batch)
      compiled = lowered.compile({"xla_dump_to": dump_dir} if dump else None)
    except Exception as e:  # noqa: BLE001
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      report.compile_s = time.perf_counter() - t0
      report.per_device_bytes = oom_required(str(e)) or 0
      report.error = str(e).strip().splitlines()[0][:500]
      return report
    report.compile_s = time.perf_counter() - t0
    report.largest_temporaries = largest_temporaries(dump_dir) if dump else []
  mem = compiled.memory_analysis()
  report.argument_bytes, report.output_bytes = mem.argument_size_in_bytes, mem.output_size_in_bytes
  report.alias_bytes, report.temp_bytes = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  report.code_bytes = mem.generated_code_size_in_bytes
  report.per_device_bytes = (report.argument_bytes + report.output_bytes - report.alias_bytes
                             + report.temp_bytes + report.code_bytes)
  report.fits = report.per_device_bytes <= report.hbm_bytes
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  # XLA counts a loop's body once: the gradient accumulation loop holds the whole forward and backward
  # pass, so one step does grad_accum_steps times its count (the optimizer update, outside it, is small).
  accum = int(config.grad_accum_steps) if which == "train" else 1
  report.flops_per_device = float(cost.get("flops", float("nan"))) * accum
  report.flops_per_image = report.flops_per_device * len(devices) / batch_size
  text = compiled.as_text()
  report.hlo_instructions = sum(1 for line in text.splitlines() if " = " in line)
  report.collectives = collectives(text)
  report.step_s_at_40pct = slices_lib.step_time_estimate(report.flops_per_device, slice_.chip.peak_bf16_tflops)
  return report


def _variant(config, **changes):
  """A copy of `config` with dotted-key changes ("model.remat": True, "grad_accum_steps": 2)."""
  c = config.copy_and_resolve_references()
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _accum_choices(config, slice_):
  """grad_accum_steps values above the current one that split the batch into micro-batches that still
  divide over the mesh's data axis."""
  data = slice_.devices // int(config.mesh.model)
  now = int(config.grad_accum_steps)
  return [k for k in (2, 4, 8, 16, 32) if k > now and config.batch_size % (k * data) == 0]


def what_fits(config, slice_, report, *, config_name="", log=print, max_compiles=6, options=3):
  """Settings under which the train step of `config` fits, each found by compiling it (not estimated), in
  this order, until `options` are found: the smallest gradient accumulation, rematerialisation, FSDP
  (when the state is a large part of the memory), the smallest larger slice of the same generation.
  [(flag text, StepReport)], fitting ones only."""
  found, compiles = [], 0
  hbm = report.hbm_bytes
  fixed = report.argument_bytes + report.output_bytes - report.alias_bytes + report.code_bytes
  need = report.per_device_bytes

  def attempt(label, cfg, sl=slice_):
    nonlocal compiles
    if compiles >= max_compiles or len(found) >= options:
      return None
    compiles += 1
    log(f"  trying {label} ...")
    try:
      r = compile_step(cfg, sl, "train", config_name=config_name, dump=False)
    except ValueError as e:  # a combination the config check refuses (e.g. batch over the devices)
      log(f"  {label}: {str(e).splitlines()[-1].strip(' -')}")
      return None
    log(f"  {label}: {r.per_device_bytes / GIB:.2f} GiB of {r.hbm_bytes / GIB:.2f} "
        f"({'fits' if r.fits else 'does not fit'})")
    if r.fits:
      found.append((label, r))
    return r

  # Gradient accumulation: temporaries shrink about with the micro-batch; start at the estimate.
  choices = _accum_choices(config, slice_)
  if choices:
    temp = max(need - fixed, 1) if not report.temp_bytes else report.temp_bytes
    now = int(config.grad_accum_steps)
    guess = next((k for k in choices if fixed + temp * now / k <= 0.9 * hbm), choices[-1])
    i = choices.index(guess)
    while i < len(choices):
      r = attempt(f"--config.grad_accum_steps={choices[i]}", _variant(config, grad_accum_steps=choices[i]))
      if r is None or r.fits:
        break
      i += 1
  if not config.model.remat:
    attempt("--config.model.remat=True", _variant(config, **{"model.remat": True}))
  if not config.mesh.fsdp and report.argument_bytes > 0.15 * hbm and slice_.devices > 1:
    attempt("--config.mesh.fsdp=True", _variant(config, **{"mesh.fsdp": True}))
  # A larger slice of the same chip: as many more chips as the estimate says, then double.
  chips = slice_.chips
  while chips * 2 * slice_.num_slices <= int(config.batch_size) // int(config.grad_accum_steps):
    chips *= 2
    if fixed + (need - fixed) * slice_.chips / chips > 0.9 * hbm:
      continue
    bigger = slices_lib.parse(f"{slice_.chip.generation}-{chips * (2 if slice_.chip.megacore else 1)}",
                              slice_.num_slices)
    r = attempt(f"--topology {bigger}", config, bigger)
    if r is None or r.fits:
      break
  return found


def _fmt_bytes(n):
  return f"{n / GIB:.2f} GiB" if n >= 2 ** 28 else f"{n / 2 ** 20:.1f} MiB"


def describe(report):
  """The human-readable lines of one StepReport."""
  r = report
  head = (f"{r.step} step of {r.config or 'the config'} on {r.slice} ({r.topology}"
          f"{f' x {r.num_slices} slices' if r.num_slices > 1 else ''}, {r.devices} devices), global batch "
          f"{r.global_batch} at {r.canvas[0]}x{r.canvas[1]}; "
          + ", ".join(f"{k}={v}" for k, v in r.settings.items()))
  lines = [head]
  if r.error:  # refused: the compiler's figure when it gave up is a lower bound of the need
    lines.append(f"  memory per device: more than the {_fmt_bytes(r.hbm_bytes)} of HBM: DOES NOT FIT (the "
                 f"compiler refused: {r.error})")
  else:
    lines.append(f"  memory per device: {_fmt_bytes(r.per_device_bytes)} of {_fmt_bytes(r.hbm_bytes)} HBM: "
                 f"{'FITS' if r.fits else 'DOES NOT FIT'}")
    lines.append(f"    arguments {_fmt_bytes(r.argument_bytes)}, outputs {_fmt_bytes(r.output_bytes)} "
                 f"(donated {_fmt_bytes(r.alias_bytes)}), temporaries {_fmt_bytes(r.temp_bytes)}, code "
                 f"{_fmt_bytes(r.code_bytes)}")
    for size, shape, op in r.largest_temporaries[:5]:
      lines.append(f"    temporary {_fmt_bytes(size)} {shape}: {op[-100:]}")
    lines.append(f"  compute: {r.flops_per_device / 1e12:.4g} TFLOP per device per step (XLA's count: loop "
                 f"bodies once), {r.flops_per_image / 1e9:.4g} GFLOP per image; at {UTILISATION:.0%} of the "
                 f"chip's bfloat16 peak a step takes {1e3 * r.step_s_at_40pct:.4g} ms")
    coll = ", ".join(f"{k} x{v['count']} ({_fmt_bytes(v['bytes'])})" for k, v in sorted(r.collectives.items()))
    lines.append(f"  collectives: {coll or 'none'}; HLO {r.hlo_instructions} instructions")
  lines.append(f"  compiled in {r.compile_s:.1f} s")
  return "\n".join(lines)


def run(config, slice_, *, steps=("train", "eval"), search=True, options=3, config_name="", log=print):
  """Compiles `steps` of `config` for `slice_`; (reports, what fits) where what fits is
  [(flag text, StepReport)] when the train step does not fit and `search` is on, else []."""
  reports, fits_with = [], []
  for which in steps:
    r = compile_step(config, slice_, which, config_name=config_name)
    log(describe(r))
    reports.append(r)
    if which == "train" and not r.fits and search:
      log("  searching for settings that fit (each one compiled):")
      fits_with = what_fits(config, slice_, r, config_name=config_name, log=log, options=options)
      if fits_with:
        log("  fits with: " + "; ".join(f"{label} ({_fmt_bytes(x.per_device_bytes)})" for label, x in fits_with))
      else:
        log("  nothing tried fits: use a larger slice or a smaller batch")
  return reports, fits_with


def to_json(reports, fits_with):
  """One object for one step, a list for several; a train step that does not fit carries `fits_with`."""
  rows = [r.to_json() for r in reports]
  for row in rows:
    if row["step"] == "train" and not row["fits"]:
      row["fits_with"] = [dict(x.to_json(), setting=label) for label, x in fits_with]
  return rows[0] if len(rows) == 1 else rows


def markdown_table(rows):
  """A markdown table of train-step reports (tpu_compile's JSON rows): the one in docs/benchmarks.md."""
  lines = ["| config | slice | global batch | settings | GiB per device | of HBM | fits | TFLOP/device/step "
           f"| step s at {UTILISATION:.0%} of peak | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()
                         if (k, v) not in (("model.remat", False), ("grad_accum_steps", 1), ("mesh.fsdp", False),
                                           ("mesh.model", 1), ("loss.point_sampling", False)))
    flops = r.get("flops_per_device")
    step = r.get("step_s_at_40pct")
    need = f"{r['per_device_bytes'] / GIB:.2f}"
    if r.get("error"):  # the compiler refused: what it reported when it gave up, a lower bound
      need = f"> {r['hbm_bytes'] / GIB:.2f} (refused at {need})"
    lines.append(f"| {r['config']} | {r['slice']} | {r['global_batch']} | {settings} | "
                 f"{need} | {r['hbm_bytes'] / GIB:.2f} | {'yes' if r['fits'] else '**no**'} "
                 f"| {'-' if flops is None else f'{flops / 1e12:.2f}'} | {'-' if step is None else f'{step:.3f}'} "
                 f"| {r['compile_s']:.0f} |")
  return "\n".join(lines)


def main(argv):
  from absl import flags
  flags_ = flags.FLAGS
  if _TABLE.value:  # summarise earlier --json reports instead of compiling
    rows = []
    for path in argv[1:]:
      with open(path) as f:
        data = json.load(f)
      for r in data if isinstance(data, list) else [data]:
        rows += [r] + [dict(x, config=f"{x['config']} ({x['setting']})") for x in r.get("fits_with", [])]
    print(markdown_table([r for r in rows if r["step"] == "train"]))
    return 0
  config = _CONFIG.value
  if _BATCH.value:
    config.batch_size = _BATCH.value
  try:
    slice_ = slices_lib.parse(_TOPOLOGY.value, _NUM_SLICES.value)
  except ValueError as e:
    raise SystemExit(f"error: --topology: {e}") from None
  steps = tuple(_STEPS.value)
  bad = set(steps) - {"train", "eval"}
  if bad:
    raise SystemExit(f"--steps {','.join(steps)}: each is train or eval")
  overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]  # shown with the config in reports
  config_name = " ".join([flags_["config"].serialize().partition("=")[2], *overrides])
  try:
    reports, fits_with = run(config, slice_, steps=steps, search=not _NO_SEARCH.value, options=_OPTIONS.value,
                             config_name=config_name)
  except NoTpuCompiler as e:
    raise SystemExit(f"error: {e}") from None
  except ValueError as e:  # config.validate: what to change
    raise SystemExit(f"error: {e}") from None
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(to_json(reports, fits_with), f, indent=2)
  return 0 if all(r.fits for r in reports) else 1


def _parse_flags(argv):
  """--config and --topology are required unless --table (summarise JSON reports) is given."""
  from absl import flags
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:  # an unknown flag, a value of the wrong type
    raise SystemExit(f"error: {e}") from None
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # a --config.KEY that is not a key
    text = re.sub(r"\\(['\"])", r"\1", str(e.args[0] if e.args else e)).replace("\\n", " ").replace("\n", " ")
    raise SystemExit(f"error: a --config override does not fit the config: {text.strip(chr(39))}") from None
  if not flags.FLAGS.table:
    for name in ("config", "topology"):
      if flags.FLAGS[name].value is None:
        raise SystemExit(f"--{name} is required (e.g. --config configs/coco_panoptic.py --topology v4-8)")
  return rest


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  global _CONFIG, _TOPOLOGY, _BATCH, _NUM_SLICES, _STEPS, _JSON, _NO_SEARCH, _OPTIONS, _TABLE
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/coco_panoptic.py "
                                            "or configs/mask2former.py:backbone=swin_l.")
  _TOPOLOGY = flags.DEFINE_string("topology", None, "v4-8, v4-32, v5e-16 (v5litepod-16), v5p-8, v6e-8, ... "
                                  "or a compiler topology such as v5e:2x2.")
  _BATCH = flags.DEFINE_integer("batch", 0, "Global batch (default: the config's batch_size).")
  _NUM_SLICES = flags.DEFINE_integer("num-slices", 1, "Multislice: slices joined over DCN.")
  _STEPS = flags.DEFINE_list("steps", ["train", "eval"], "Which steps to compile.")
  _JSON = flags.DEFINE_string("json", "", "Write the report(s) here as JSON.")
  _NO_SEARCH = flags.DEFINE_bool("no-search", False, "When the train step does not fit, do not compile "
                                 "variants to find what would.")
  _OPTIONS = flags.DEFINE_integer("options", 3, "When the train step does not fit: stop after this many "
                                  "settings that fit (each found by compiling it).")
  _TABLE = flags.DEFINE_bool("table", False, "Print the markdown table of the --json reports named as "
                             "arguments (no compilation), e.g. --table runs/*.json.")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
