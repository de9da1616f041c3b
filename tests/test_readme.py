"""The README's two quickstart commands, as a new user runs them.

The test command must be exactly what `.ci/run` runs, and both must install from the lock. The main job
runs through the same CLI with the README's own relative `--config` and `--workdir` (shortened by
overrides, with checkpointing, an evaluation and a resume in it), from a fresh directory: a green suite
once hid a main job that crashed at its first checkpoint because orbax refused the relative workdir.
"""
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
LOCK = "constraints.txt"


def quickstart_commands():
  """The bash blocks of the README's Quickstart section, in order."""
  text = (ROOT / "README.md").read_text()
  section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
  return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quickstart_has_two_commands_both_from_the_lock_and_ci_runs_the_test_command():
  demo, tests = quickstart_commands()
  for command in (demo, tests):
    assert command.startswith("python3 -m venv .venv && .venv/bin/pip install ")
    assert f"-c {LOCK}" in command, command
  assert "maskformer_jax.train --config configs/demo.py --workdir runs/demo" in demo
  assert "pytest" in tests
  ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith("#")]
  assert tests in ci, f".ci/run must run the README's test command: {tests!r}"
  assert (ROOT / LOCK).is_file()


def test_lock_pins_every_dependency_exactly():
  """Every line of the lock is `name==version`, and it pins every direct dependency of the package."""
  import tomllib
  pins = {}
  for line in (ROOT / LOCK).read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
      name, sep, version = line.partition("==")
      assert sep and version and "+" not in version, f"{LOCK}: {line!r} is not an exact pin"
      pins[re.sub(r"[-_.]+", "-", name.lower())] = version
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  requirements = project["dependencies"] + project["optional-dependencies"]["test"]
  for requirement in requirements:
    name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower())
    assert name in pins, f"{requirement} is not pinned in {LOCK}"


def main_job(demo_command):
  """The README's main job as argv: its last `&&` step, with the venv's python replaced by ours."""
  argv = shlex.split(demo_command.split("&&")[-1])
  assert argv[0] == ".venv/bin/python" and argv[1:3] == ["-m", "maskformer_jax.train"], argv
  return [sys.executable, *argv[1:]]


@pytest.mark.slow
def test_main_job_as_written_checkpoints_evaluates_and_resumes(tmp_path):
  argv = main_job(quickstart_commands()[0])
  assert "runs/demo" in argv  # relative, as the user types it
  os.symlink(ROOT / "configs", tmp_path / "configs")  # a fresh directory holding the checkout's configs
  short = ["--config.total_steps=40", "--config.train.checkpoint_every=20",
           "--config.evals.val.every=20", "--config.train.log_every=10"]
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),  # the rerun reuses it
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("XLA_FLAGS", None)  # one CPU device, as on a user's machine
  run = lambda *extra: subprocess.run(argv + short + list(extra), cwd=tmp_path, env=env,  # noqa: E731
                                      capture_output=True, text=True, timeout=900)
  r = run()
  assert r.returncode == 0, r.stderr[-4000:]
  workdir = tmp_path / "runs" / "demo"
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [20, 40]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  pq_rows = [row for row in rows if "pq" in row]
  assert [row["step"] for row in pq_rows] == [20, 40] and all(0 <= row["pq"] <= 100 for row in pq_rows)
  assert pq_rows[-1]["num_images"] == 100  # the demo's whole held-out split
  # Running it again resumes (here with more steps) instead of starting over.
  r = run("--config.total_steps=60")
  assert r.returncode == 0, r.stderr[-4000:]
  assert "Resumed from the checkpoint at step 40" in r.stderr
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows if "pq" in row] == [20, 40, 60]
  assert 60 in [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
