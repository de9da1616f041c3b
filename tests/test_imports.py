"""The house rules that keep the package easy to change: every module imports on its own, the module-level
import graph has no cycles, and nothing imports a command-line module (they hold flags and main() only)."""
import ast
import concurrent.futures
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
PACKAGE = ROOT / "maskformer_jax"
CLIS = {"maskformer_jax.train", "maskformer_jax.evaluate", "maskformer_jax.predict",
        "maskformer_jax.convert.__main__"}


def modules():
  out = []
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
  return out


def imported(module):
  """The maskformer_jax modules `module` imports at module level (not inside functions or __main__)."""
  path = ROOT / (module.replace(".", "/") + ".py")
  if not path.exists():
    path = ROOT / module.replace(".", "/") / "__init__.py"
  names = set()
  for node in ast.parse(path.read_text()).body:  # top-level statements only
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names |= {f"{node.module}.{a.name}" for a in node.names}
  known = set(modules())
  return {n for n in names if n in known and n != module}


def test_no_module_imports_a_command_line_module():
  offenders = {m: sorted(imported(m) & CLIS) for m in modules()}
  assert not {m: v for m, v in offenders.items() if v}


def test_module_level_imports_have_no_cycle():
  graph = {m: imported(m) for m in modules()}
  state = {}

  def visit(m, stack):
    state[m] = "open"
    for n in sorted(graph[m]):
      # A package's __init__ is imported before its submodules; importing one's own package is no cycle.
      if m.startswith(n + "."):
        continue
      if state.get(n) == "open":
        raise AssertionError(" -> ".join(stack + [m, n]))
      if n not in state:
        visit(n, stack + [m])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [])


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
  def one(module):
    r = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    return module, r.returncode, r.stderr[-1500:]

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    failed = [(m, err) for m, rc, err in pool.map(one, modules()) if rc]
  assert not failed, failed
