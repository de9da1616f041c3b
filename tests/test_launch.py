import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
spec = importlib.util.spec_from_file_location("sweep", ROOT / "launch" / "sweep.py")
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)
CONFIG = str(ROOT / "configs" / "ade20k.py")


def test_grid_expands_to_every_combination_with_distinct_workdirs():
  cmds = sweep.commands(CONFIG, "gs://b/sweep/", ["a:z1", "b:z2"],
                        ["optim.base_lr=1e-4,6e-5", "optim.weight_decay=1e-4,0.01"])
  assert len(cmds) == 4
  assert [c[2] for c in cmds] == ["a", "b", "a", "b"]  # round-robin over the TPUs
  workdirs = [c[5] for c in cmds]
  assert len(set(workdirs)) == 4 and all(w.startswith("gs://b/sweep/") for w in workdirs)
  assert cmds[1][6:] == ["--config.optim.base_lr=0.0001", "--config.optim.weight_decay=0.01"]


def test_unknown_key_or_wrong_type_fails_before_launch():
  with pytest.raises(KeyError, match="optim.base_lrr"):
    sweep.commands(CONFIG, "/tmp/w", ["a:z"], ["optim.base_lrr=1e-4"])
  with pytest.raises(KeyError, match="optimizer"):
    sweep.commands(CONFIG, "/tmp/w", ["a:z"], ["optimizer.base_lr=1e-4"])
  with pytest.raises(TypeError, match="batch_size"):
    sweep.commands(CONFIG, "/tmp/w", ["a:z"], ["batch_size=big"])
  with pytest.raises(ValueError, match="KEY=V1"):
    sweep.expand(["optim.base_lr"])


def test_cli_prints_commands_without_launching():
  out = subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), "--config", CONFIG, "--workdir-root", "/tmp/w",
                        "--tpu", "t:z", "--grid", "total_steps=10,20"], capture_output=True, text=True, check=True)
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 2 and "--config.total_steps=20" in lines[1] and "tpu_vm.sh train t z" in lines[1]


def test_tpu_vm_script_is_valid_bash():
  subprocess.run(["bash", "-n", str(ROOT / "launch" / "tpu_vm.sh")], check=True)


def _named_configs(text):
  """The config files a text names, as "configs/x.py" or "configs/x.py:arg" (quotes and commas aside)."""
  words = (w.strip("'\",()[]") for w in text.split())
  return [w for w in words if w.startswith("configs/") and ".py" in w and "*" not in w]


def _check_loads(name):
  from maskformer_jax.config import load_config
  path, _, arg = name.partition(":")
  assert (ROOT / path).is_file(), name
  load_config(f"{ROOT / path}:{arg}" if arg else ROOT / path)  # a bad family argument raises


def test_notebook_cells_are_valid_python_and_name_real_configs():
  import ast
  import json
  nb = json.loads((ROOT / "notebooks" / "colab_tpu.ipynb").read_text())
  for cell in nb["cells"]:
    if cell["cell_type"] != "code":
      continue
    src = "".join(cell["source"])
    python = "\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("!", "%", "--")))
    ast.parse(python)  # shell/magic lines aside, the cell is Python
    for name in _named_configs(src):
      _check_loads(name)


def test_readme_and_launch_scripts_name_real_configs():
  texts = [(ROOT / f).read_text() for f in ("README.md", "launch/tpu_vm.sh", "launch/sweep.py")]
  names = [n for t in texts for n in _named_configs(t)]
  assert "configs/coco_panoptic.py:backbone=r101" in names and "configs/demo.py" in names
  for name in names:
    _check_loads(name)
