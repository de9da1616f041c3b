"""MaskFormer in JAX/Flax."""
import os as _os


def _cpu_convolutions_without_ynnpack():
  """XLA:CPU hands convolutions to YNNPACK by default, whose kernel gradients run ~4x slower than XLA's
  own convolutions (a 3x3 256->256 conv on 2x128x128: 2.3 s vs 0.58 s, the forward equal); on this
  model's R50 train step that is 8.1 s instead of 11.4 s (docs/benchmarks.md, "Where the train step's
  time goes"). Keep YNNPACK for dots only. CPU-only, read when the backend starts (so it acts when
  this package is imported before the first computation), skipped when the user sets the flag, and
  only on the jaxlib series it was measured on: XLA aborts on flags it does not know, and this one is
  experimental."""
  flag = "--xla_cpu_experimental_ynn_fusion_type"
  flags = _os.environ.get("XLA_FLAGS", "")
  try:
    from jaxlib import version
    series = tuple(int(x) for x in version.__version__.split(".")[:2])
  except (ImportError, ValueError):
    return
  if series == (0, 10) and flag not in flags:
    _os.environ["XLA_FLAGS"] = f"{flags} {flag}=individual_dot".strip()


_cpu_convolutions_without_ynnpack()
