"""TPU slices by name: the topology the TPU compiler needs, and each chip's memory and peak.

A slice is named as Cloud TPU names accelerator types ("v4-8", "v5litepod-16", "v5p-8", "v6e-4"; "v5e-16"
is taken for "v5litepod-16") or as a compiler topology ("v5e:2x2", "v4:2x2x1"). v4 and v5p names count
TensorCores, two to a chip, and a VM shows one device per chip ("megacore"); v5e and v6e names count
chips of one core. Chip figures are the vendor's data sheets (docs/reference.md, "TPU chips").
"""
import dataclasses
import math
import re


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str  # "v4", "v5e", "v5p", "v6e"
  topology_prefix: str  # how the compiler's topology names it ("v5:2x2x1" is a v5p)
  megacore: bool  # two TensorCores a chip, one device (v4, v5p): the accelerator name counts cores
  dims: int  # torus dimensions of a slice
  hbm_gib: float  # memory per chip (one device)
  peak_bf16_tflops: float  # dense bfloat16 peak per chip


CHIPS = {
    "v4": Chip("v4", "v4", True, 3, 32.0, 275.0),
    "v5e": Chip("v5e", "v5e", False, 2, 16.0, 197.0),
    "v5p": Chip("v5p", "v5", True, 3, 95.0, 459.0),
    "v6e": Chip("v6e", "v6e", False, 2, 32.0, 918.0),
}
_ALIASES = {"v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5lite": "v5e", "v5p": "v5p", "v6e": "v6e"}
_BY_PREFIX = {c.topology_prefix: c for c in CHIPS.values()}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # "v4-8": the Cloud TPU accelerator type
  chip: Chip
  shape: tuple  # chips along each torus axis
  num_slices: int = 1  # Multislice: this many such slices joined over the data-centre network

  @property
  def chips(self) -> int:
    """Chips (= devices) of one slice."""
    return math.prod(self.shape)

  @property
  def devices(self) -> int:
    return self.chips * self.num_slices

  @property
  def topology(self) -> str:
    return f"{self.chip.topology_prefix}:" + "x".join(map(str, self.shape))

  @property
  def accelerator_type(self) -> str:
    """What `gcloud compute tpus` calls it (v5e is "v5litepod")."""
    count = self.chips * (2 if self.chip.megacore else 1)
    return f"{'v5litepod' if self.chip.generation == 'v5e' else self.chip.generation}-{count}"

  def __str__(self):
    return self.name if self.num_slices == 1 else f"{self.num_slices}x{self.name}"


def torus_shape(chips: int, dims: int) -> tuple:
  """The slice shape Cloud TPU uses for `chips` chips: from 2x2(x1), double the smallest axis (the last
  of equal ones), e.g. 16 v4 chips 2x2x4, 32 2x4x4, 64 4x4x4; 16 v5e chips 4x4, 32 4x8."""
  if chips == 1:
    return (1,) * dims
  shape = [2, 2] + [1] * (dims - 2)
  if chips < 4 or chips & (chips - 1):
    raise ValueError(f"{chips} chips: slices here have 1 or a power of two >= 4 chips; name the "
                     f"topology instead, e.g. 'v5e:2x4'")
  while math.prod(shape) < chips:
    smallest = min(shape)
    i = max(j for j, s in enumerate(shape) if s == smallest)
    shape[i] *= 2
  return tuple(shape)


def parse(name: str, num_slices: int = 1) -> Slice:
  """A Slice from "v4-8", "v5litepod-16", "v5e-16", "v5p-8", "v6e-4" or a topology "v5e:2x2" / "v4:2x2x1"."""
  text = str(name).strip().lower()
  if num_slices < 1:
    raise ValueError(f"num_slices={num_slices} must be >= 1")
  topo = re.fullmatch(r"(v4|v5e|v5|v5p|v6e):(\d+(?:x\d+)*)", text)
  if topo:
    chip = CHIPS["v5p"] if topo.group(1) in ("v5", "v5p") else _BY_PREFIX[topo.group(1)]
    shape = tuple(int(s) for s in topo.group(2).split("x"))
    if len(shape) != chip.dims or min(shape) < 1:
      raise ValueError(f"topology {name!r}: a {chip.generation} slice has {chip.dims} axes, e.g. "
                       f"{chip.topology_prefix}:{'x'.join(['2'] * 2 + ['1'] * (chip.dims - 2))}")
    count = math.prod(shape) * (2 if chip.megacore else 1)
    return Slice(f"{chip.generation}-{count}", chip, shape, num_slices)
  named = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
  if not named or named.group(1) not in _ALIASES:
    raise ValueError(f"TPU slice {name!r}: expected e.g. v4-8, v4-32, v5e-16 (v5litepod-16), v5p-8, v6e-8, "
                     f"or a topology such as v5e:2x2 or v4:2x2x1")
  chip = CHIPS[_ALIASES[named.group(1)]]
  count = int(named.group(2))
  if chip.megacore and count % 2:
    raise ValueError(f"TPU slice {name!r}: {chip.generation} names count TensorCores, two a chip: use an "
                     f"even number, e.g. {chip.generation}-8 (4 chips)")
  chips = count // 2 if chip.megacore else count
  return Slice(f"{chip.generation}-{count}", chip, torus_shape(chips, chip.dims), num_slices)


def peak_tflops(device_kind: str):
  """Dense bfloat16 peak of one device from jax's `device_kind` ("TPU v5 lite", "NVIDIA H100 ..."), or
  None where unknown (CPUs)."""
  kind = device_kind.lower()
  for key, value in _PEAK_BY_KIND:
    if key in kind:
      return value
  return None


# By a substring of jax's device_kind, most specific first (vendor data sheets; GPUs for bench/).
_PEAK_BY_KIND = (("h200", 989.0), ("h100", 989.0), ("a100", 312.0), ("l4", 121.0),
                 ("tpu v5 lite", 197.0), ("tpu v5e", 197.0), ("tpu v5p", 459.0), ("tpu v5", 459.0),
                 ("tpu v6 lite", 918.0), ("tpu v6e", 918.0), ("tpu v4", 275.0))


UTILISATION = 0.4  # the step time to expect is quoted at this fraction of the chip's bfloat16 peak


def step_time_estimate(flops_per_device: float, peak_bf16_tflops: float, utilisation: float = UTILISATION):
  """Seconds a step of `flops_per_device` should take on a chip of that peak at `utilisation` of it: what a
  first run on hardware is compared against (bench.tpu_compile's table, bench.train_step's measurements;
  docs/benchmarks.md, "Will it fit?")."""
  return flops_per_device / (peak_bf16_tflops * 1e12 * utilisation)
