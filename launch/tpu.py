"""TPU VMs and pod slices for maskformer_jax: create one (directly or through a queued resource, on demand,
spot, preemptible, best-effort or reserved), install this checkout on every worker from the lock, start the
same training command on all workers at once, tail their logs, and keep a spot run going through
preemptions until it finishes.

  python launch/tpu.py create --name my-v4 --zone us-central2-b --accelerator v4-32 [--queued] [--spot]
  python launch/tpu.py setup  --name my-v4 --zone us-central2-b
  python launch/tpu.py train  --name my-v4 --zone us-central2-b --config configs/coco_panoptic.py \
      --workdir gs://bucket/runs/r50 --config.data.root=gs://bucket/coco
  python launch/tpu.py tail   --name my-v4 --zone us-central2-b        # every worker, lines prefixed
  python launch/tpu.py stop   --name my-v4 --zone us-central2-b        # SIGTERM: the run saves and exits
  python launch/tpu.py delete --name my-v4 --zone us-central2-b [--queued]
  python launch/tpu.py run    --name my-v4 --zone us-central2-b --accelerator v4-32 --queued --spot \
      --config configs/coco_panoptic.py:backbone=r101 --workdir gs://bucket/runs/r101   # all of the above
  python launch/tpu.py watch  ...same flags as run, for a run already started

`run` creates the slice if it does not exist, installs, trains and then polls the slice's state; when the
slice is lost (PREEMPTED, SUSPENDED, FAILED, TERMINATED or deleted) it deletes and recreates it, installs
again and restarts the same command, which resumes from its workdir. So the workdir must be a gs:// path:
a worker's disk does not outlive the slice. It returns when WORKDIR/metrics.jsonl reaches total_steps.
Pre-flight: train, run and watch first compile the train step for the slice's accelerator type with the
TPU compiler, on this machine (python -m maskformer_jax.bench.tpu_compile; needs libtpu, `pip install -e
'.[tpu]'`, no TPU), and refuse a config that does not fit, saying what would (--skip-preflight skips it).
A result is cached per program, slice type and commit (~/.cache/maskformer_jax/preflight).
Every subcommand takes --dry-run: it prints the exact commands (gcloud with all its flags, git, the scripts
run over ssh) and runs none of them. The checkout is shipped with `git archive HEAD`: commit first.
"""
import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
REMOTE_DIR = "maskformer_jax"  # in the home directory of every worker
PROVISIONING = ("standard", "spot", "preemptible", "best-effort", "reserved")
RUNTIMES = (("v5litepod-", "v2-alpha-tpuv5-lite"), ("v5p-", "v2-alpha-tpuv5"), ("v6e-", "v2-alpha-tpuv6e"),
            ("v4-", "tpu-ubuntu2204-base"))
# State of a slice, reduced to what the watcher acts on. Queued resources report ACTIVE once the nodes
# exist; a node itself reports READY. A deleted one is not found (MISSING).
READY, PENDING, LOST, MISSING, UNKNOWN = "READY", "PENDING", "LOST", "MISSING", "UNKNOWN"
_STATES = {
    "ACTIVE": READY, "READY": READY,
    "CREATING": PENDING, "ACCEPTED": PENDING, "PROVISIONING": PENDING, "WAITING_FOR_RESOURCES": PENDING,
    "STARTING": PENDING, "RESTARTING": PENDING, "REPAIRING": PENDING,
    "PREEMPTED": LOST, "TERMINATED": LOST, "FAILED": LOST, "SUSPENDING": LOST, "SUSPENDED": LOST,
    "DELETING": LOST,
}
RUN_NAME = re.compile(r"^[A-Za-z0-9._=+:-]+$")  # safe unquoted in the remote shell and as a file name


# ------------------------------------------------------------------------------------------------
# What to create and what to run.

@dataclasses.dataclass
class Slice:
  """A TPU VM or pod slice; with `queued`, held by a queued resource of the same name."""
  name: str
  zone: str
  accelerator: str | None = None
  runtime_version: str | None = None
  queued: bool = False
  provisioning: str = "standard"
  project: str | None = None
  python: str = "python3"  # on the workers; if older than 3.11 (the lock's minimum), setup installs 3.11

  def __post_init__(self):
    if self.provisioning not in PROVISIONING:
      raise ValueError(f"provisioning {self.provisioning!r}: expected one of {PROVISIONING}")
    if self.provisioning == "best-effort" and not self.queued:
      raise ValueError("--best-effort exists only for queued resources: add --queued (or use --spot)")
    if self.provisioning == "preemptible" and self.queued:
      raise ValueError("--preemptible is for a TPU VM created directly; a queued resource takes --spot")

  @property
  def runtime(self) -> str:
    if self.runtime_version:
      return self.runtime_version
    for prefix, runtime in RUNTIMES:
      if (self.accelerator or "").startswith(prefix):
        return runtime
    raise ValueError(f"no default runtime for --accelerator {self.accelerator!r}: pass --runtime-version "
                     "(see https://cloud.google.com/tpu/docs/runtimes)")


@dataclasses.dataclass
class Job:
  """The training command every worker runs. `overrides` are '--config.KEY=VALUE' flags."""
  config: str
  workdir: str
  overrides: list = dataclasses.field(default_factory=list)
  run_name: str = "train"

  def __post_init__(self):
    if not RUN_NAME.match(self.run_name):
      raise ValueError(f"--run-name {self.run_name!r}: use letters, digits and . _ = + : - only")
    for flag in self.overrides:
      if not flag.startswith("--config.") or "=" not in flag:
        raise ValueError(f"{flag!r}: training overrides are written --config.KEY=VALUE "
                         "(e.g. --config.total_steps=1000)")

  @property
  def log(self) -> str:
    return f"~/logs/{self.run_name}.log"

  @property
  def pid(self) -> str:
    return f"~/logs/{self.run_name}.pid"

  def override_dict(self) -> dict:
    return {f[len("--config."):].partition("=")[0]: parse_value(f.partition("=")[2]) for f in self.overrides}


def parse_value(text):
  import ast
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string such as a path or a recipe name


def validate(config_path, overrides):
  """Applies the overrides to a fresh config: unknown keys and wrong types raise, naming the key."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)  # a checkout works without `pip install -e .`
  from maskformer_jax.config import load_config
  config = load_config(config_path)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      if p not in node:
        raise KeyError(f"{config_path}: no config key {key!r} (no {p!r} section)")
      node = node[p]
    if leaf not in node:
      raise KeyError(f"{config_path}: no config key {key!r}; see maskformer_jax/config.py for the keys")
    try:
      setattr(node, leaf, value)
    except TypeError as e:
      raise TypeError(f"{config_path}: {key}={value!r}: {e}") from None
  return config


def remote_config_path(config: str) -> str:
  """The config as the workers see it: relative to the shipped checkout (which is where they run)."""
  path, sep, arg = config.rpartition(":") if config.rpartition(":")[0].endswith(".py") else (config, "", "")
  full = os.path.abspath(path)
  if not os.path.isfile(full):
    raise FileNotFoundError(f"--config {config!r}: no such file (expected e.g. configs/coco_panoptic.py)")
  rel = os.path.relpath(full, REPO)
  if rel.startswith(".."):
    raise ValueError(f"--config {config!r} is outside this checkout ({REPO}); only the checkout is shipped "
                     "to the workers: put the config file under configs/ and commit it")
  return rel + sep + arg


# ------------------------------------------------------------------------------------------------
# Pre-flight: will the config fit the slice? Compiled for it with the TPU compiler, here, before anything
# is created or started (python -m maskformer_jax.bench.tpu_compile; libtpu from PyPI, no TPU needed).

class PreflightError(RuntimeError):
  """The config does not fit the slice (the message says what would), or the check could not run."""


def preflight_argv(config, overrides, accelerator, json_path, num_slices=1) -> list:
  """The check, run here (in the checkout, so the config file is made absolute first)."""
  path, sep, arg = config.rpartition(":") if config.rpartition(":")[0].endswith(".py") else (config, "", "")
  config = os.path.abspath(path) + sep + arg
  return [sys.executable, "-m", "maskformer_jax.bench.tpu_compile", "--config", config, "--topology", accelerator,
          f"--num-slices={num_slices}", "--steps=train", "--options=1", f"--json={json_path}", *overrides]


def _preflight_cache_dir():
  return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "maskformer_jax",
                      "preflight")


def preflight_key(config_path, overrides, accelerator, num_slices=1) -> str:
  """What decides the compiled train step: the program's config keys (tpu_compile.program_config, so a
  sweep over learning rates compiles once), the slice and the code being shipped (git HEAD)."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from maskformer_jax.bench.tpu_compile import program_config  # noqa: E402  (imports no JAX backend)
  config = validate(config_path, overrides)
  head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
  text = json.dumps([program_config(config), accelerator, num_slices, head], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:24]


def subprocess_checker(argv):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)


def preflight(job, accelerator, *, num_slices=1, checker=None, log=None, cache=True):
  """Compiles `job`'s train step for `accelerator` (cached by preflight_key); returns the report (a
  dict, tpu_compile's JSON). Raises PreflightError when it does not fit, naming what would."""
  log = log or (lambda msg: print(msg, flush=True))
  checker = checker or subprocess_checker
  key = preflight_key(job.config, job.override_dict(), accelerator, num_slices) if cache else None
  cached = os.path.join(_preflight_cache_dir(), f"{key}.json") if key else None
  if cached and os.path.exists(cached):
    with open(cached) as f:
      report = json.load(f)
    log(f"pre-flight: {accelerator} was checked for this program before ({cached})")
  else:
    log(f"pre-flight: compiling {job.config} for {accelerator} with the TPU compiler (a few minutes; "
        "--skip-preflight skips it)")
    with tempfile.TemporaryDirectory() as d:
      out = os.path.join(d, "report.json")
      r = checker(preflight_argv(job.config, job.overrides, accelerator, out, num_slices))
      if not os.path.exists(out):
        tail = ((r.stderr or "") + (r.stdout or "")).strip().splitlines()[-1:] or [f"exit {r.returncode}"]
        raise PreflightError(f"the pre-flight compilation for {accelerator} did not finish: {tail[0]} "
                             "(it needs libtpu here: pip install -e '.[tpu]'; or pass --skip-preflight)")
      with open(out) as f:
        report = json.load(f)
    if cached:
      os.makedirs(os.path.dirname(cached), exist_ok=True)
      with open(cached, "w") as f:
        json.dump(report, f)
  gib = lambda n: f"{n / 2 ** 30:.2f} GiB"  # noqa: E731
  where = f"{accelerator}{f' x {num_slices}' if num_slices > 1 else ''}"
  if report["fits"]:
    log(f"pre-flight: the train step fits {where}: {gib(report['per_device_bytes'])} of "
        f"{gib(report['hbm_bytes'])} per device")
    return report
  options = [f"{o['setting']} ({gib(o['per_device_bytes'])})" for o in report.get("fits_with", [])]
  raise PreflightError(
      f"{job.config} does not fit {where}: its train step needs {gib(report['per_device_bytes'])} per device "
      f"of {gib(report['hbm_bytes'])}. " + (f"It fits with: {'; '.join(options)}. " if options else
                                            "Nothing tried fits: use a larger slice or a smaller batch. ")
      + "(--skip-preflight starts it anyway.)")


# ------------------------------------------------------------------------------------------------
# Command lines. Each function returns an argv (a list); nothing here runs anything.

def _g(s: Slice, *argv) -> list:
  """gcloud ARGV... NAME --zone=Z [--project=P]: the resource's name and place first, then its flags."""
  return ["gcloud", *argv, s.name, f"--zone={s.zone}", *([f"--project={s.project}"] if s.project else [])]


def create_argv(s: Slice) -> list:
  if not s.accelerator:
    raise ValueError(f"creating {s.name} needs --accelerator (e.g. v4-8, v5litepod-16, v6e-8)")
  if s.queued:
    alpha = ["alpha"] if s.provisioning == "best-effort" else []  # --best-effort is alpha-only
    argv = _g(s, *alpha, "compute", "tpus", "queued-resources", "create") + [
        f"--node-id={s.name}", f"--accelerator-type={s.accelerator}", f"--runtime-version={s.runtime}"]
  else:
    argv = _g(s, "compute", "tpus", "tpu-vm", "create") + [f"--accelerator-type={s.accelerator}",
                                                           f"--version={s.runtime}"]
  return argv + ([f"--{s.provisioning}"] if s.provisioning != "standard" else [])


def delete_argv(s: Slice) -> list:
  if s.queued:  # --force deletes the nodes first, then the request
    return _g(s, "compute", "tpus", "queued-resources", "delete") + ["--force", "--quiet"]
  return _g(s, "compute", "tpus", "tpu-vm", "delete") + ["--quiet"]


def state_argv(s: Slice) -> list:
  if s.queued:
    return _g(s, "compute", "tpus", "queued-resources", "describe") + ["--format=value(state.state)"]
  return _g(s, "compute", "tpus", "tpu-vm", "describe") + ["--format=value(state)"]


def ssh_argv(s: Slice, script: str, worker="all") -> list:
  return _g(s, "compute", "tpus", "tpu-vm", "ssh") + [f"--worker={worker}", "--command", script]


def archive_path(s: Slice) -> str:
  return os.path.join(tempfile.gettempdir(), f"maskformer_jax-{s.name}.tar.gz")


def setup_argvs(s: Slice) -> list:
  """Ship HEAD with git archive, then on every worker: a fresh venv with the package from the lock."""
  tarball = archive_path(s)
  py = shlex.quote(s.python)
  script = (
      "set -e; "
      # The TPU images' Ubuntu 22.04 has Python 3.10 and the lock needs >= 3.11: install Ubuntu's 3.11.
      f"PY={py}; $PY -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {{ "
      "echo \"$(hostname): $PY is older than 3.11 (the lock's minimum): installing python3.11\"; "
      "sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y "
      "python3.11 python3.11-venv >/dev/null; PY=python3.11; }; "
      f"rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR} ~/logs && "
      f"tar -xzf ~/{REMOTE_DIR}.tar.gz -C ~/{REMOTE_DIR} && cd ~/{REMOTE_DIR} && "
      "$PY -m venv .venv && .venv/bin/pip install -q -U pip && "
      ".venv/bin/pip install -q -c constraints.txt -e . 'jax[tpu]' && echo installed on $(hostname)")
  return [["git", "-C", REPO, "archive", "--format=tar.gz", "-o", tarball, "HEAD"],
          ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{s.name}:{REMOTE_DIR}.tar.gz", f"--zone={s.zone}",
           *([f"--project={s.project}"] if s.project else []), "--worker=all"],
          ssh_argv(s, script)]


def train_script(job: Job) -> str:
  """setsid + nohup: the run outlives the ssh session; its pid and log stay on each worker."""
  cmd = shlex.join([".venv/bin/python", "-m", "maskformer_jax.train", "--config", remote_config_path(job.config),
                    "--workdir", job.workdir, *job.overrides])
  # Not `cd && setsid ... &`: that would background the whole list and $! would be a subshell's pid.
  return (f"mkdir -p ~/logs; cd ~/{REMOTE_DIR} || exit 1; "
          f"setsid nohup {cmd} >> {job.log} 2>&1 < /dev/null & echo $! > {job.pid}; "
          f"echo started {job.run_name} on $(hostname)")


def stop_script(job: Job) -> str:
  return f"kill -TERM $(cat {job.pid} 2>/dev/null) 2>/dev/null; echo stopped {job.run_name} on $(hostname)"


def alive_script(job: Job) -> str:
  return f"kill -0 $(cat {job.pid} 2>/dev/null) 2>/dev/null && echo alive || echo gone"


def tail_script(job: Job, lines: int = 100, follow: bool = True) -> str:
  """Each worker prefixes its own lines with its worker number (the TPU VM metadata has it)."""
  meta = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"
  return (f"w=$(curl -sf -H 'Metadata-Flavor: Google' {meta} || hostname); "
          f"tail -n {int(lines)} {'-F ' if follow else ''}{job.log} | sed -u \"s/^/[worker $w] /\"")


# ------------------------------------------------------------------------------------------------
# Running them: a runner is injectable so that tests drive everything with a fake gcloud.

def subprocess_runner(argv, capture=False):
  return subprocess.run(argv, capture_output=capture, text=True)


class Shell:
  """Runs argvs (or, with dry_run, prints them and runs nothing)."""

  def __init__(self, dry_run=False, runner=None, out=None):
    self.dry_run, self.runner = dry_run, runner or subprocess_runner
    self.out = out or (lambda line: print(line, flush=True))

  def __call__(self, argv, *, check=True, capture=False):
    if self.dry_run:
      self.out(shlex.join(argv))
      return subprocess.CompletedProcess(argv, 0, "", "")
    result = self.runner(argv, capture)
    if check and result.returncode != 0:
      err = (result.stderr or "").strip() if capture else ""
      raise RuntimeError(f"failed (exit {result.returncode}): {shlex.join(argv)}" + (f"\n{err}" if err else ""))
    return result


def state(sh: Shell, s: Slice) -> str:
  """READY, PENDING, LOST, MISSING or UNKNOWN (a gcloud error other than not-found: try again later)."""
  r = sh(state_argv(s), check=False, capture=True)
  if r.returncode != 0:
    return MISSING if re.search(r"NOT_FOUND|not found", r.stderr or "", re.I) else UNKNOWN
  return _STATES.get((r.stdout or "").strip().upper(), UNKNOWN)


def create(sh, s):
  sh(create_argv(s))


def delete(sh, s):
  sh(delete_argv(s))


def setup(sh, s):
  for argv in setup_argvs(s):
    sh(argv)


def train(sh, s, job):
  sh(ssh_argv(s, train_script(job)))


def stop(sh, s, job):
  sh(ssh_argv(s, stop_script(job)), check=False)


def alive(sh, s, job):
  """Whether worker 0 still runs the job: True, False, or None when ssh itself failed."""
  r = sh(ssh_argv(s, alive_script(job), worker=0), check=False, capture=True)
  out = (r.stdout or "").split()
  return None if r.returncode != 0 or not out else out[-1] == "alive"


def last_train_step(workdir) -> int | None:
  """The step of the last training row of WORKDIR/metrics.jsonl (local or gs://); None without one."""
  from etils import epath
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return None
  step = None
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue  # a line cut short by a kill
    if isinstance(row, dict) and "eval" not in row and "step" in row:
      step = int(row["step"])
  return step


def write_status(workdir, status: str, message: str = "", **extra):
  """WORKDIR/launch_status.json: what the watcher last saw, read by `sweep.py summary`."""
  from etils import epath
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  row = {"status": status, "message": message, "time": time.time(), **extra}
  (path / "launch_status.json").write_text(json.dumps(row) + "\n")


def keep_running(sh, s, job, total_steps, *, launched, poll_s=60.0, max_restarts=20, max_launch_failures=3,
                 max_recreate_attempts=30, delete_when_done=False, sleep=time.sleep, log=None) -> int:
  """Polls the slice until the run reaches total_steps; recreates and relaunches a lost slice.

  launched: whether the job already runs on the slice (watch) or still has to be started (run). A missing
  slice before the first launch is created; after it, missing means deleted, which counts as lost.
  A failed re-creation (no capacity yet) is tried again at the next poll. Returns 0 when finished, 1 when
  the run stopped by itself short of total_steps (seen twice in a row, so a preemption's SIGTERM that beats
  the state change is not mistaken for it), or restarts or re-creation attempts ran out.
  """
  log = log or (lambda msg: print(f"[{datetime.datetime.now():%H:%M:%S}] {s.name}: {msg}", flush=True))
  restarts, gone, launch_failures, attempts, need_launch = 0, 0, 0, 0, not launched
  status = lambda st, msg="": write_status(job.workdir, st, msg, tpu=s.name, zone=s.zone, restarts=restarts)
  while True:
    step = last_train_step(job.workdir)
    if step is not None and step >= total_steps:
      log(f"finished: step {step} of {total_steps}")
      status("finished")
      if delete_when_done:
        delete(sh, s)
      return 0
    st = state(sh, s)
    if st == MISSING and not launched:
      log("not found: creating it")
      create(sh, s)
      launched = True  # from here on, missing means deleted under us
    elif st in (LOST, MISSING):
      if not need_launch:  # the run was going: a new loss
        if restarts >= max_restarts:
          log(f"lost again after {restarts} restarts: giving up (--max-restarts)")
          status("failed", f"slice lost after {restarts} restarts")
          return 1
        restarts += 1
      need_launch, gone, attempts = True, 0, attempts + 1
      if attempts > max_recreate_attempts:  # e.g. a queued resource that fails every time
        log(f"could not bring the slice back in {max_recreate_attempts} attempts: giving up")
        status("failed", f"slice not recreated in {max_recreate_attempts} attempts")
        return 1
      log(f"slice {st.lower()}: deleting and recreating it (restart {restarts} of at most {max_restarts})")
      status("restarting", f"slice {st.lower()}")
      if st == LOST:
        sh(delete_argv(s), check=False)  # may be half gone already; create says if it is not
      try:
        create(sh, s)
      except RuntimeError as e:  # no capacity right now, or the old one not deleted yet
        log(f"{e}\ntrying again in {poll_s:g} s")
    elif st == READY and need_launch and not launched and alive(sh, s, job):
      log(f"{job.run_name} already runs there: watching it")  # `run` again after the watcher was stopped
      need_launch, launched = False, True
      status("running")
    elif st == READY and need_launch:
      try:
        setup(sh, s)
        train(sh, s, job)
      except RuntimeError as e:  # ssh to a slice that just came up can fail for a while
        launch_failures += 1
        log(f"launch failed ({launch_failures} of {max_launch_failures}): {e}")
        if launch_failures >= max_launch_failures:
          status("failed", f"launch failed: {e}")
          return 1
      else:
        need_launch, launched, gone, launch_failures, attempts = False, True, 0, 0, 0
        log(f"started {job.run_name} (from step {step or 0})")
        status("running")
    elif st == READY:
      running = alive(sh, s, job)
      gone = gone + 1 if running is False else 0
      if gone >= 2:
        log(f"the run stopped at step {step} short of {total_steps}: see `tail`")
        status("failed", f"the training process exited at step {step} of {total_steps}")
        return 1
      status("running")
    else:
      log(f"state {st}: waiting")
      status("waiting", f"slice {st.lower()}")
    sleep(poll_s)


# ------------------------------------------------------------------------------------------------
# Command line.

def _parser():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
  sub = p.add_subparsers(dest="cmd", required=True)
  common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  common.add_argument("--name", required=True, help="TPU (and queued resource) name")
  common.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-east5-a (v6e)")
  common.add_argument("--project", help="default: gcloud's core/project")
  common.add_argument("--queued", action="store_true", help="the slice is held by a queued resource NAME")
  common.add_argument("--dry-run", action="store_true", help="print the commands, run none of them")
  make = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  make.add_argument("--accelerator", help="accelerator type: v4-8, v4-32, v5litepod-16, v5p-8, v6e-8, ...")
  make.add_argument("--runtime-version", help="default by generation: " +
                    ", ".join(f"{p}*: {r}" for p, r in RUNTIMES))
  for kind in PROVISIONING[1:]:
    make.add_argument(f"--{kind}", dest="provisioning", action="store_const", const=kind,
                      help={"spot": "spot capacity (cheaper, can be preempted at any time)",
                            "preemptible": "preemptible TPU VM (direct creation only)",
                            "best-effort": "best-effort queued resource (gcloud alpha)",
                            "reserved": "use the project's reservation"}[kind])
  make.add_argument("--python", default="python3", help="Python on the workers (setup installs python3.11 where it is older than the lock's 3.11)")
  job = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  job.add_argument("--run-name", default="train", help="names the log and pid files ~/logs/RUN.{log,pid}")
  run_args = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  run_args.add_argument("--config", required=True, help="e.g. configs/coco_panoptic.py:backbone=r101")
  run_args.add_argument("--workdir", required=True, help="gs://... so that it outlives the slice")
  run_args.add_argument("--poll-s", type=float, default=60.0)
  run_args.add_argument("--max-restarts", type=int, default=20)
  run_args.add_argument("--delete-when-done", action="store_true", help="delete the slice once finished")
  check = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  check.add_argument("--skip-preflight", action="store_true", help="start without first compiling the train "
                     "step for the slice with the TPU compiler to check that it fits")
  helps = {"create": "create the TPU VM / pod slice", "setup": "ship this checkout and install it on every "
           "worker", "train": "start training on all workers (then return)", "tail": "follow the logs of "
           "every worker", "stop": "SIGTERM the run (it saves and exits)", "delete": "delete the slice "
           "(and its queued resource)", "status": "print the slice's state",
           "run": "create if missing, setup, train, then restart after preemptions until finished",
           "watch": "restart an already started run after preemptions until finished"}
  parents = {"create": [common, make], "setup": [common, make], "train": [common, job],
             "tail": [common, job], "stop": [common, job], "delete": [common], "status": [common],
             "run": [common, make, job, run_args, check], "watch": [common, make, job, run_args, check]}
  for name, ps in parents.items():
    sp = sub.add_parser(name, parents=ps, help=helps[name], allow_abbrev=False)
    if name == "train":
      sp.add_argument("--config", required=True)
      sp.add_argument("--workdir", required=True)
      sp.add_argument("--accelerator", help="the slice's accelerator type for the pre-flight check (default: "
                      "asked of gcloud)")
      sp.add_argument("--skip-preflight", action="store_true", help=check._actions[0].help)
    if name == "tail":
      sp.add_argument("--lines", type=int, default=100)
      sp.add_argument("--no-follow", action="store_true")
      sp.add_argument("--worker", default="all", help="all, or one worker's number")
  return p


def accelerator_argv(s: Slice) -> list:
  if s.queued:
    return _g(s, "compute", "tpus", "queued-resources", "describe") + [
        "--format=value(tpu.nodeSpec[0].node.acceleratorType)"]
  return _g(s, "compute", "tpus", "tpu-vm", "describe") + ["--format=value(acceleratorType)"]


def check_fits(sh, s, job, *, checker=None):
  """The pre-flight of train/run/watch: the slice's accelerator type (from --accelerator, else gcloud),
  then `preflight`. With --dry-run, prints the check's command instead of running it."""
  accelerator = s.accelerator
  if not accelerator and not sh.dry_run:
    r = sh(accelerator_argv(s), check=False, capture=True)
    accelerator = (r.stdout or "").strip() if r.returncode == 0 else ""
    if not accelerator:
      raise PreflightError(f"cannot tell the accelerator type of {s.name} for the pre-flight check: pass "
                           "--accelerator (e.g. v4-8), or --skip-preflight")
  if sh.dry_run:
    sh.out("# pre-flight, run here first (no TPU needed): will the train step fit the slice?")
    sh.out(shlex.join(preflight_argv(job.config, job.overrides, accelerator or "<the slice's type>",
                                     "report.json")))
    return None
  return preflight(job, accelerator, checker=checker, log=sh.out)


def main(argv=None, runner=None, sleep=time.sleep, checker=None):
  p = _parser()
  args, extra = p.parse_known_args(argv)
  if extra and args.cmd not in ("train", "run", "watch"):
    p.error(f"unexpected arguments {extra}")
  try:
    s = Slice(args.name, args.zone, getattr(args, "accelerator", None), getattr(args, "runtime_version", None),
              args.queued, getattr(args, "provisioning", None) or "standard", args.project,
              getattr(args, "python", "python3"))
    job = Job(getattr(args, "config", ""), getattr(args, "workdir", ""), extra,
              getattr(args, "run_name", "train"))
    if args.cmd in ("train", "run", "watch"):
      config = validate(job.config, job.override_dict())  # a misspelt override fails here, not on the pod
      remote_config_path(job.config)
      if args.cmd != "train" and "://" not in job.workdir:
        print(f"warning: --workdir {job.workdir} is local to each worker: a recreated slice cannot resume "
              "from it; use gs://", file=sys.stderr)
  except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
    p.error(str(e.args[0] if isinstance(e, KeyError) else e))
  sh = Shell(args.dry_run, runner)
  try:
    if args.cmd in ("train", "run", "watch") and not args.skip_preflight:
      check_fits(sh, s, job, checker=checker)
    if args.cmd == "create":
      create(sh, s)
    elif args.cmd == "setup":
      setup(sh, s)
    elif args.cmd == "train":
      train(sh, s, job)
    elif args.cmd == "tail":
      sh(ssh_argv(s, tail_script(job, args.lines, not args.no_follow), worker=args.worker), check=False)
    elif args.cmd == "stop":
      stop(sh, s, job)
    elif args.cmd == "delete":
      delete(sh, s)
    elif args.cmd == "status":
      sh(state_argv(s), check=False)
    elif sh.dry_run:  # run / watch: the commands of one launch and one poll, not a loop
      sh(state_argv(s))
      if args.cmd == "run":
        sh.out("# if not found:")
        create(sh, s)
      sh.out("# once READY (ACTIVE):")
      setup(sh, s)
      train(sh, s, job)
      sh.out(f"# then every {args.poll_s:g} s: the state above and, on worker 0:")
      sh(ssh_argv(s, alive_script(job), worker=0))
      sh.out("# when lost: delete, create, setup and train again, as above:")
      delete(sh, s)
    else:
      return keep_running(sh, s, job, int(config.total_steps), launched=args.cmd == "watch",
                          poll_s=args.poll_s, max_restarts=args.max_restarts,
                          delete_when_done=args.delete_when_done, sleep=sleep)
  except PreflightError as e:  # nothing was created or started
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (RuntimeError, ValueError) as e:  # a failed command; a lost --tpu slice without --accelerator
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
