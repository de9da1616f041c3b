"""Sweep a config over a grid of overrides and slice types: one run per combination, each with a readable
name, its own workdir and its own TPU, all launched at once; then a table (and a plot) of how they did.

  python launch/sweep.py --config configs/ade20k.py --workdir-root gs://bucket/sweeps/lr \
      --slice v4-8 --slice v4-32 --zone us-central2-b --queued --spot \
      --grid optim.base_lr=1e-4,6e-5 --grid optim.weight_decay=1e-4,0.01 [--dry-run | --launch]
  python launch/sweep.py --config configs/ade20k.py --workdir-root gs://bucket/sweeps/lr \
      --tpu my-v4-a:us-central2-b --tpu my-v4-b:us-central2-b --grid optim.base_lr=1e-4,6e-5 [--launch]
  python launch/sweep.py summary --workdir-root gs://bucket/sweeps/lr [--metric val/pq] [--plot lr.png]

Every combination is checked against the config *before* anything starts (a misspelt key or a value of
the wrong type fails here, not an hour later on a pod); with --launch, each run's train step is also
compiled for its slice type with the TPU compiler (launch/tpu.py's pre-flight, once per distinct program),
and if one does not fit nothing is launched and the error says what would (--skip-preflight skips it). Each is given a readable run name (the slice type, then
the overrides) and its own workdir WORKDIR_ROOT/NAME. With --slice, each run gets a slice of its own,
named from the run name, created by `launch/tpu.py run` (which restarts it after preemptions and deletes
it when the run finishes, unless --keep-slices). With --tpu, runs go round-robin onto existing TPUs; a TPU
takes its next run only after the previous one finished. Without --launch the `launch/tpu.py` commands
are printed; --dry-run prints every gcloud command they would run. --launch writes
WORKDIR_ROOT/sweep.json (the runs, their overrides, slice, TPU and workdir), which `summary` reads, and
waits for the runs (run it under tmux or nohup); each run's local log is in --log-dir.
"""
import argparse
import dataclasses
import datetime
import hashlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TPU_PY = os.path.join(HERE, "tpu.py")
sys.path.insert(0, HERE)
import tpu  # noqa: E402  (launch/tpu.py, beside this file)

parse_value, validate = tpu.parse_value, tpu.validate
MANIFEST = "sweep.json"
STALE_S = 2 * 3600.0  # no new metrics row for this long: the run is no longer running


@dataclasses.dataclass
class Run:
  name: str
  overrides: dict
  workdir: str
  tpu: str
  zone: str
  slice: str | None  # the accelerator type of the run's own slice; None on a --tpu pool
  total_steps: int


def expand(grid):
  """['a.b=1,2', 'c=x'] -> [{'a.b': 1, 'c': 'x'}, {'a.b': 2, 'c': 'x'}]."""
  axes = []
  for item in grid:
    key, sep, values = item.partition("=")
    if not sep or not key or not values:
      raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. optim.base_lr=1e-4,6e-5)")
    axes.append([(key, parse_value(v)) for v in values.split(",")])
  return [dict(combo) for combo in itertools.product(*axes)]


def run_name(overrides, slice_type=None):
  """'v4-8_base_lr=0.0001_weight_decay=0.01': the last part of each key, unless two keys share it."""
  leaves = [k.split(".")[-1] for k in overrides]
  parts = [f"{k.split('.')[-1] if leaves.count(k.split('.')[-1]) == 1 else k}={v}" for k, v in overrides.items()]
  name = "_".join(([slice_type] if slice_type else []) + (parts or ["base"]))
  return re.sub(r"[^A-Za-z0-9._=+:-]", "-", name)  # safe as a path part and a remote file name


def tpu_name(prefix, name):
  """A valid TPU name (lowercase, digits, '-', starting with a letter) from a run name, unique by a hash."""
  slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
  digest = hashlib.sha1(name.encode()).hexdigest()[:6]
  return f"{prefix}-{slug}"[:40].rstrip("-") + f"-{digest}"


def plan(config_path, workdir_root, grid, *, slices=(), zone=None, tpus=(), tpu_prefix="mf"):
  """The runs of a sweep, every override validated first: grid x slices, or grid round-robin over tpus."""
  if bool(slices) == bool(tpus):
    raise ValueError("give either --slice TYPE (each run gets a slice of its own, with --zone) or "
                     "--tpu NAME:ZONE (existing TPUs), not both and not neither")
  if slices and not zone:
    raise ValueError("--slice needs --zone (e.g. us-central2-b for v4, us-east5-a for v6e)")
  if tpus and any(t.count(":") != 1 for t in tpus):
    raise ValueError(f"--tpu {tpus}: each is NAME:ZONE (e.g. my-v4:us-central2-b)")
  if not re.match(r"^[a-z][a-z0-9-]*$", tpu_prefix):
    raise ValueError(f"--tpu-prefix {tpu_prefix!r}: lowercase letters, digits and '-', starting with a letter")
  combos = expand(grid)
  totals = [int(validate(config_path, overrides).total_steps) for overrides in combos]
  root = workdir_root.rstrip("/")
  runs = []
  for i, (overrides, total) in enumerate(zip(combos, totals)):
    for slice_type in slices or [None]:
      name = run_name(overrides, slice_type)
      if slice_type:
        where = (tpu_name(tpu_prefix, name), zone)
      else:
        where = tuple(tpus[i % len(tpus)].split(":"))
      runs.append(Run(name, overrides, f"{root}/{name}", *where, slice_type, total))
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f"two runs would share a name (and a workdir): {sorted(n for n in names if names.count(n) > 1)}")
  return runs


def preflight(config_path, runs, *, checker=None, log=print):
  """Compiles the train step of every run that gets a slice of its own for that slice type, once per
  distinct program (a grid over learning rates compiles once per slice type), before anything is
  created. {run name: error message} of the runs that do not fit (or could not be checked)."""
  failures, done = {}, {}
  for run in runs:
    if not run.slice:
      continue  # an existing TPU: its own `tpu.py run` asks gcloud for the type and checks
    job = tpu.Job(config_path, run.workdir, [f"--config.{k}={v}" for k, v in run.overrides.items()], run.name)
    key = tpu.preflight_key(config_path, run.overrides, run.slice)
    if key not in done:
      try:
        tpu.preflight(job, run.slice, checker=checker, log=log)
        done[key] = None
      except tpu.PreflightError as e:
        done[key] = str(e)
    if done[key]:
      failures[run.name] = done[key]
  return failures


def run_argv(config_path, run, *, queued=False, provisioning=None, project=None, keep_slices=False,
             poll_s=60.0, checked=False):
  """The `launch/tpu.py run` command of one run (`checked`: its pre-flight already ran here)."""
  argv = [sys.executable, TPU_PY, "run", "--name", run.tpu, "--zone", run.zone]
  if project:
    argv += ["--project", project]
  if run.slice:
    argv += ["--accelerator", run.slice]
    argv += ["--queued"] if queued else []
    argv += [f"--{provisioning}"] if provisioning else []
    argv += [] if keep_slices else ["--delete-when-done"]
  argv += ["--config", config_path, "--workdir", run.workdir, "--run-name", run.name, "--poll-s", f"{poll_s:g}"]
  argv += ["--skip-preflight"] if checked and run.slice else []
  return argv + [f"--config.{k}={v}" for k, v in run.overrides.items()]


def manifest(config_path, grid, runs, argvs):
  return {"config": config_path, "created": datetime.datetime.now().isoformat(timespec="seconds"),
          "grid": list(grid), "runs": [{**dataclasses.asdict(r), "command": shlex.join(a)}
                                       for r, a in zip(runs, argvs)]}


def write_manifest(workdir_root, data):
  from etils import epath
  root = epath.Path(workdir_root)
  root.mkdir(parents=True, exist_ok=True)
  (root / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")
  return root / MANIFEST


def subprocess_launcher(argv, log_path):
  with open(log_path, "a") as f:
    return subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT).returncode


def launch(runs, argvs, log_dir, launcher=subprocess_launcher):
  """Runs on different TPUs at once, runs on the same TPU one after the other; {run name: exit code}."""
  os.makedirs(log_dir, exist_ok=True)
  queues = {}
  for run, argv in zip(runs, argvs):
    queues.setdefault((run.tpu, run.zone), []).append((run, argv))
  codes = {}

  def work(queue):
    for run, argv in queue:
      codes[run.name] = launcher(argv, os.path.join(log_dir, f"{run.name}.log"))
      print(f"{run.name}: {'finished' if codes[run.name] == 0 else f'exit {codes[run.name]}'}", flush=True)

  threads = [threading.Thread(target=work, args=(q,)) for q in queues.values()]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return codes


# ------------------------------------------------------------------------------------------------
# Summary: where every run of a sweep stands.

def _read_json(path):
  try:
    return json.loads(path.read_text()) if path.exists() else None
  except ValueError:
    return None


def find_runs(workdir_root):
  """The manifest's runs; without one, every directory under the root that has metrics or a config."""
  from etils import epath
  root = epath.Path(workdir_root)
  data = _read_json(root / MANIFEST)
  if data is not None:
    return data["runs"]
  if not root.exists():
    raise FileNotFoundError(f"--workdir-root {workdir_root}: no such directory")
  return [{"name": d.name, "workdir": os.fspath(d), "overrides": {}} for d in sorted(root.iterdir())
          if d.is_dir() and ((d / "metrics.jsonl").exists() or (d / "config.json").exists())]


def run_status(run, *, stale_s=STALE_S, now=None):
  """One run's status, last step and loss, and the (step, value) series of every eval metric.

  finished: the last train step reached total_steps (the run's own config.json, else the manifest's).
  not started: no train row yet. failed: the launcher marked it so (launch_status.json: the process exited
  short of total_steps, or the slice could not be brought back), or no new row for stale_s seconds.
  running: a row in the last stale_s seconds. waiting / restarting: the launcher is bringing the slice
  back (its marker is recent), so old rows are expected.
  """
  from etils import epath
  now = time.time() if now is None else now
  workdir = epath.Path(run["workdir"])
  config = _read_json(workdir / "config.json") or {}
  total = config.get("total_steps", run.get("total_steps"))
  marker = _read_json(workdir / "launch_status.json") or {}
  path = workdir / "metrics.jsonl"
  rows = []
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        rows.append(json.loads(line))
      except ValueError:
        pass  # a line cut short by a kill
  train = [r for r in rows if isinstance(r, dict) and "eval" not in r and "step" in r]
  evals = {}
  for r in rows:
    if isinstance(r, dict) and "eval" in r:
      for k, v in r.items():
        if k not in ("step", "eval", "eval_time_s", "wall_time_s") and isinstance(v, int | float):
          evals.setdefault(f"{r['eval']}/{k}", []).append((int(r["step"]), float(v)))
  last = train[-1] if train else {}
  step = last.get("step")
  try:
    age = now - path.stat().mtime if rows else None
  except (OSError, AttributeError, NotImplementedError):
    age = None
  marker_recent = now - marker.get("time", 0) <= stale_s
  if not train:
    status, note = ("failed", marker.get("message", "")) if marker.get("status") == "failed" else ("not started", "")
  elif total is not None and step >= total:
    status, note = "finished", ""
  elif marker.get("status") == "failed":
    status, note = "failed", marker.get("message", "")
  elif age is not None and age <= stale_s:
    status, note = "running", ""
  elif marker.get("status") in ("waiting", "restarting") and marker_recent:
    status, note = marker["status"], marker.get("message", "")
  else:
    status = "failed"
    note = f"stopped at step {step} of {total}" + (f", no row for {age / 3600:.1f} h" if age is not None else "")
  return {"name": run["name"], "overrides": run.get("overrides", {}), "slice": run.get("slice"),
          "status": status, "note": note, "step": step, "total_steps": total, "loss": last.get("loss"),
          "evals": evals, "best_metric": (config.get("train") or {}).get("best_metric")}


def summarize(workdir_root, metrics=(), *, stale_s=STALE_S, now=None):
  """(rows, metrics): every run's status; metrics default to the runs' train.best_metric, else all."""
  rows = [run_status(r, stale_s=stale_s, now=now) for r in find_runs(workdir_root)]
  if not metrics:
    metrics = sorted({r["best_metric"] for r in rows if r["best_metric"]}) or \
        sorted({m for r in rows for m in r["evals"]})
  return rows, list(metrics)


def _fmt(v):
  if v is None:
    return "-"
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(rows, metrics):
  """Run, overrides, status, last step, last loss, best and last of each eval metric (higher is better)."""
  head = ["run", "overrides", "status", "step", "loss"] + [f"{m} {w}" for m in metrics for w in ("best", "last")]
  lines = []
  for r in rows:
    cells = [r["name"], " ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "-",
             r["status"] + (f" ({r['note']})" if r["note"] else ""),
             "-" if r["step"] is None else f"{r['step']}/{_fmt(r['total_steps'])}", _fmt(r["loss"])]
    for m in metrics:
      series = [v for _, v in r["evals"].get(m, [])]
      cells += [_fmt(max(series)) if series else "-", _fmt(series[-1]) if series else "-"]
    lines.append(cells)
  widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
  return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *lines])


def plot(rows, metrics, path):
  """One panel per eval metric, one line per run: the metric against the training step."""
  try:
    import matplotlib
  except ImportError:
    raise SystemExit("--plot needs matplotlib: pip install matplotlib (it is in the [test] extra)") from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(6 * max(len(metrics), 1), 4), squeeze=False)
  for ax, m in zip(axes[0], metrics):
    for r in rows:
      if r["evals"].get(m):
        steps, values = zip(*r["evals"][m])
        ax.plot(steps, values, marker="o", label=r["name"])
    ax.set(title=m, xlabel="step", ylabel=m)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def summary_main(argv):
  p = argparse.ArgumentParser(prog="sweep.py summary", description=run_status.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir-root", required=True, help="the sweep's root (local or gs://)")
  p.add_argument("--metric", action="append", default=[], help="EVAL/METRIC, e.g. val/pq (repeatable; "
                 "default: the config's train.best_metric)")
  p.add_argument("--stale-hours", type=float, default=STALE_S / 3600, help="no new row for this long: failed")
  p.add_argument("--plot", help="write a plot of the eval metrics against the step here (PNG, PDF, SVG)")
  args = p.parse_args(argv)
  try:
    rows, metrics = summarize(args.workdir_root, args.metric, stale_s=args.stale_hours * 3600)
  except FileNotFoundError as e:
    p.error(str(e))
  print(table(rows, metrics))
  if args.plot:
    print(f"wrote {plot(rows, metrics, args.plot)}")
  return 0


def main(argv=None, launcher=subprocess_launcher, checker=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["summary"]:
    return summary_main(argv[1:])
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
  p.add_argument("--config", required=True)
  p.add_argument("--workdir-root", required=True, help="each run's workdir is WORKDIR_ROOT/RUN_NAME")
  p.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... (repeatable)")
  p.add_argument("--slice", action="append", default=[], help="accelerator type of a slice per run, e.g. "
                 "v4-8 (repeatable: every run on every type)")
  p.add_argument("--zone", help="zone of the --slice slices")
  p.add_argument("--queued", action="store_true", help="create the slices through queued resources")
  for kind in tpu.PROVISIONING[1:]:
    p.add_argument(f"--{kind}", dest="provisioning", action="store_const", const=kind)
  p.add_argument("--project")
  p.add_argument("--tpu-prefix", default="mf", help="slices are named PREFIX-RUN-NAME-HASH")
  p.add_argument("--keep-slices", action="store_true", help="don't delete a run's slice when it finishes")
  p.add_argument("--tpu", action="append", default=[], help="NAME:ZONE of an existing TPU VM (repeatable)")
  p.add_argument("--poll-s", type=float, default=60.0, help="how often each run's slice state is checked")
  p.add_argument("--log-dir", help="local logs of the launchers, one per run (default sweep_logs/ROOT_NAME)")
  p.add_argument("--skip-preflight", action="store_true", help="launch without first compiling each run's "
                 "train step for its slice type to check that it fits")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--launch", action="store_true", help="start the runs (and wait for them)")
  mode.add_argument("--dry-run", action="store_true", help="print every command the runs would run")
  args = p.parse_args(argv)
  if args.provisioning and not args.slice:
    p.error(f"--{args.provisioning} is for the slices --slice creates; a --tpu pool is used as it is")
  try:
    runs = plan(args.config, args.workdir_root, args.grid, slices=args.slice, zone=args.zone, tpus=args.tpu,
                tpu_prefix=args.tpu_prefix)
    if args.slice:  # fail on a bad combination here, not in the first launcher
      tpu.Slice("x", args.zone, args.slice[0], None, args.queued, args.provisioning or "standard")
  except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
    p.error(str(e.args[0] if isinstance(e, KeyError) else e))
  check = args.launch and not args.skip_preflight
  if check:
    failures = preflight(args.config, runs, checker=checker)
    if failures:
      for name, message in failures.items():
        print(f"error: {name}: {message}", file=sys.stderr)
      print(f"{len(failures)} of {len(runs)} runs do not fit their slices: nothing was launched", file=sys.stderr)
      return 2
  argvs = [run_argv(args.config, r, queued=args.queued, provisioning=args.provisioning, project=args.project,
                    keep_slices=args.keep_slices, poll_s=args.poll_s, checked=check) for r in runs]
  data = manifest(args.config, args.grid, runs, argvs)
  if args.dry_run:
    for run, argv in zip(runs, argvs):
      print(f"# {run.name}: {run.workdir} on {run.tpu} ({run.slice or 'existing'}, {run.zone})")
      tpu.main(argv[2:] + ["--dry-run"])
    print(f"# and the manifest: {args.workdir_root.rstrip('/')}/{MANIFEST}")
    return 0
  if not args.launch:
    for argv in argvs:
      print(shlex.join(argv))
    return 0
  print(f"wrote {write_manifest(args.workdir_root, data)}")
  log_dir = args.log_dir or os.path.join("sweep_logs", os.path.basename(args.workdir_root.rstrip("/")))
  print(f"{len(runs)} runs on {len({(r.tpu, r.zone) for r in runs})} TPUs; launcher logs in {log_dir}/")
  codes = launch(runs, argvs, log_dir, launcher)
  return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
