"""The notebooks (notebooks/*.ipynb) run top to bottom in a Jupyter kernel, as on Colab, here on the CPU.

The kernel is this interpreter (a kernelspec written for the test, not whatever `python3` kernel the
machine has), sees the checkout on PYTHONPATH, and gets MASKFORMER_NOTEBOOK_SMOKE=1: the quickstart
then trains 20 steps on a tiny dataset instead of the whole demo. Cells are found by their tags.
"""
import json
import os
import pathlib
import re
import sys

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
# Cheaper CPU code generation (as FAST_COMPILE in _multihost_worker.py): compiling dominates these runs.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def execute(name, tmp_path):
  """Runs notebooks/<name> in a fresh kernel with cwd tmp_path; returns the executed notebook."""
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager
  from nbclient import NotebookClient
  kernels = tmp_path / "kernels"
  (kernels / "pytest-python").mkdir(parents=True)
  (kernels / "pytest-python" / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "pytest's Python", "language": "python"}))
  env = dict(os.environ, MASKFORMER_NOTEBOOK_SMOKE="1", MASKFORMER_DATA=str(tmp_path / "data"),
             XLA_FLAGS=FAST_COMPILE_FLAGS, JAX_PLATFORMS="cpu", MPLBACKEND="module://matplotlib_inline.backend_inline",
             PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  km = KernelManager(kernel_name="pytest-python", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
  client = NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env=env)
  return nb


def cell(nb, tag):
  (found,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
  return found


def text(c):
  return "".join(o.get("text", "") for o in c.outputs if o.output_type == "stream")


def has_picture(c):
  return any("image/png" in o.get("data", {}) for o in c.outputs if o.output_type == "display_data")


@pytest.mark.parametrize("name", ["quickstart.ipynb", "inference.ipynb"])
def test_notebook_is_committed_without_outputs(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(nb)
  for c in nb.cells:
    if c.cell_type == "code":
      assert c.outputs == [] and c.execution_count is None, f"{name}: clear the outputs of cell {c.id}"


@pytest.mark.slow
def test_quickstart_trains_predicts_and_plots(tmp_path):
  nb = execute("quickstart.ipynb", tmp_path)
  workdir = tmp_path / "runs" / "demo"  # the notebook's absolute workdir, under the kernel's cwd
  assert f"Trained to step 20; checkpoints in {workdir}/checkpoints" in text(cell(nb, "train"))
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [10, 20]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r.get("eval") == "val"] == [10, 20]
  assert has_picture(cell(nb, "predictions"))
  predictions = json.loads((workdir / "predictions" / "predictions.json").read_text())
  assert len(predictions["annotations"]) == 4
  assert has_picture(cell(nb, "pq-curve"))
  assert re.search(r"step 20: PQ \d+\.\d", text(cell(nb, "pq-curve")))


@pytest.mark.slow
def test_inference_converts_predicts_and_agrees_with_hugging_face(tmp_path):
  nb = execute("inference.ipynb", tmp_path)
  assert "check passed: forward parity with the HF model" in text(cell(nb, "convert"))
  assert has_picture(cell(nb, "overlay"))
  table = text(cell(nb, "segments")).splitlines()
  assert table[0].split() == ["id", "category", "thing", "area", "score"]
  assert len(table) > 1
  for line in table[1:]:
    seg_id, name, thing, area, score = line.split()
    assert name in ("circle", "square", "triangle", "sky", "ground") and thing in ("yes", "no")
    assert int(area) > 0 and 0 < float(score) <= 1
  out = text(cell(nb, "compare"))
  diff = float(re.search(r"largest output difference ([0-9.e+-]+)", out).group(1))
  assert diff < 1e-3, out  # the converter's own tolerance; the logits here reach ~40
  assert "the same panoptic segments as HF's post-processing" in out, out
