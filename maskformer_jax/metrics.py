"""Metric writers: WORKDIR/metrics.jsonl (one JSON object per line, each with `step`), TensorBoard event
files (tensorboardX, no TensorFlow needed) and a progress line with ETA in the log.

Only process 0 writes; the other processes get a writer that does nothing, so callers need no `if`.
"""
import json
import math
import os
import time

from absl import logging
from etils import epath
import jax
import numpy as np


class MetricWriter:
  """Appends rows to metrics.jsonl and mirrors scalars (and images) to TensorBoard.

  A remote workdir (gs://...) cannot be appended to: there the whole file is rewritten at each write
  (a few hundred kB at most; rows are written every log_every steps).
  """

  def __init__(self, workdir, *, enabled: bool | None = None, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    workdir = os.fspath(workdir)
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self._local = "://" not in workdir
    self._tb = None
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._lines = [] if self._local else self._read_lines()
    if resume_step is not None:
      self.drop_after(resume_step)
    from tensorboardX import SummaryWriter  # imported here: processes other than 0 never need it
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)

  def _read_lines(self):
    return self.path.read_text().splitlines(keepends=True) if self.path.exists() else []

  def drop_after(self, step: int):
    """Forgets rows past `step`: a resumed run re-does those steps and would duplicate them."""
    kept = []
    for line in self._read_lines():
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError, TypeError):
        pass  # a line cut short by a kill
    if self._local:  # write-then-rename: a kill here never loses the rows before `step`
      tmp = self.path.parent / (self.path.name + ".tmp")
      tmp.write_text("".join(kept))
      os.replace(tmp, self.path)
    else:
      self.path.write_text("".join(kept))
      self._lines = kept

  def write(self, step: int, row: dict, *, prefix: str = ""):
    """One jsonl row {step, **row}; numeric entries also go to TensorBoard as `prefix/key`."""
    if not self.enabled:
      return
    row = {k: _py(v) for k, v in row.items()}
    line = json.dumps({"step": int(step), **row}) + "\n"
    if self._local:
      with open(self.path, "a") as f:
        f.write(line)
    else:
      self._lines.append(line)
      self.path.write_text("".join(self._lines))
    for k, v in row.items():
      if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
        self._tb.add_scalar(f"{prefix}/{k}" if prefix else k, v, int(step))

  def images(self, step: int, name: str, images):
    """uint8 [N, H, W, 3] images, one TensorBoard image each."""
    if not self.enabled:
      return
    for i, image in enumerate(np.asarray(images)):
      self._tb.add_image(f"{name}/{i}", image, int(step), dataformats="HWC")

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _py(v):
  if isinstance(v, np.ndarray | np.generic) or hasattr(v, "__array__"):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()
  return v


def read_jsonl(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """Steps/s and images/s since the last report, and the ETA from the rate since the first report
  (the first interval includes compilation, so the rate is measured from the end of it)."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int = 0):
    self.total_steps, self.batch_size = total_steps, batch_size
    self.last_step, self.last_time = start_step, time.time()
    self.first_step = self.first_time = None

  def update(self, step: int) -> dict:
    now = time.time()
    dt = max(now - self.last_time, 1e-9)
    steps_per_s = (step - self.last_step) / dt
    if self.first_step is None:  # the first interval includes compilation: no ETA from it
      self.first_step, self.first_time = step, now
      rate = 0.0
    else:
      rate = (step - self.first_step) / max(now - self.first_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total_steps - step) / rate if rate > 0 else math.inf
    return {"steps_per_s": steps_per_s, "images_per_s": steps_per_s * self.batch_size, "eta_s": eta}

  def line(self, step: int, loss: float, p: dict) -> str:
    return (f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.1f}%) loss {loss:.4f} "
            f"{p['steps_per_s']:.2f} steps/s {p['images_per_s']:.1f} img/s ETA {format_eta(p['eta_s'])}")


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def log(msg: str):
  if jax.process_index() == 0:
    logging.info(msg)
