import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "launch"))  # sweep.py imports tpu.py from beside it, as when run as a script
import tpu  # noqa: E402

spec = importlib.util.spec_from_file_location("sweep", ROOT / "launch" / "sweep.py")
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)
CONFIG = str(ROOT / "configs" / "ade20k.py")
DEMO = "configs/demo.py"  # relative to the checkout, as the workers see it


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
  monkeypatch.chdir(ROOT)  # config paths are given as a user at the repo root gives them


# ------------------------------------------------------------------------------------------------
# launch/tpu.py: the exact commands of every subcommand (--dry-run prints them, runs nothing).

def dry(capsys, *argv):
  """The command lines `tpu.py ARGV --dry-run` prints, each split back into its argv."""
  capsys.readouterr()
  assert tpu.main([*argv, "--dry-run"]) == 0
  return [shlex.split(l) for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]


def ssh(name, zone, script, worker="all"):
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, f"--zone={zone}", f"--worker={worker}",
          "--command", script]


def test_create_direct_and_queued_spot_and_best_effort(capsys):
  assert dry(capsys, "create", "--name", "my-v4", "--zone", "us-central2-b", "--accelerator", "v4-32") == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "my-v4", "--zone=us-central2-b",
      "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]]
  assert dry(capsys, "create", "--name", "q", "--zone", "us-east5-a", "--accelerator", "v6e-8", "--queued",
             "--spot", "--project", "p") == [[
      "gcloud", "compute", "tpus", "queued-resources", "create", "q", "--zone=us-east5-a", "--project=p",
      "--node-id=q", "--accelerator-type=v6e-8", "--runtime-version=v2-alpha-tpuv6e", "--spot"]]
  assert dry(capsys, "create", "--name", "q", "--zone", "z", "--accelerator", "v5litepod-16", "--queued",
             "--best-effort") == [[
      "gcloud", "alpha", "compute", "tpus", "queued-resources", "create", "q", "--zone=z", "--node-id=q",
      "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--best-effort"]]
  assert dry(capsys, "create", "--name", "p", "--zone", "z", "--accelerator", "v5p-8", "--preemptible")[0][-2:] == [
      "--version=v2-alpha-tpuv5", "--preemptible"]


@pytest.mark.parametrize("argv,message", [
    (["--accelerator", "v4-8", "--best-effort"], "add --queued"),
    (["--accelerator", "v4-8", "--queued", "--preemptible"], "takes --spot"),
    (["--accelerator", "v3-8"], "--runtime-version"),
    ([], "needs --accelerator"),
])
def test_create_refuses_what_gcloud_would(capsys, argv, message):
  try:
    code = tpu.main(["create", "--name", "n", "--zone", "z", *argv, "--dry-run"])
  except SystemExit as e:  # a usage error
    code = e.code
  assert code != 0 and message in capsys.readouterr().err


def test_setup_ships_head_and_installs_from_the_lock_on_every_worker(capsys):
  archive, scp, install = dry(capsys, "setup", "--name", "n", "--zone", "z")
  tarball = tpu.archive_path(tpu.Slice("n", "z"))
  assert archive == ["git", "-C", str(ROOT), "archive", "--format=tar.gz", "-o", tarball, "HEAD"]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "n:maskformer_jax.tar.gz", "--zone=z",
                 "--worker=all"]
  assert install[:-1] == ssh("n", "z", "")[:-1]
  script = install[-1]
  assert "tar -xzf ~/maskformer_jax.tar.gz -C ~/maskformer_jax" in script
  assert ".venv/bin/pip install -q -c constraints.txt -e . 'jax[tpu]'" in script
  assert "sys.version_info < (3, 11)" in script and "apt-get -qq install -y python3.11 python3.11-venv" in script
  subprocess.run(["bash", "-n", "-c", script], check=True)  # valid shell


def test_train_starts_the_same_command_on_all_workers_detached(capsys):
  check, argv = dry(capsys, "train", "--name", "n", "--zone", "z", "--config",
                    "configs/coco_panoptic.py:backbone=r101", "--workdir", "gs://b/r", "--config.data.root=gs://b/coco")
  assert check[:3] == [sys.executable, "-m", "maskformer_jax.bench.tpu_compile"]  # the pre-flight, run here
  assert check[check.index("--topology") + 1] == "<the slice's type>" and check[-1] == "--config.data.root=gs://b/coco"
  assert argv == ssh("n", "z", argv[-1])
  assert argv[-1] == (
      "mkdir -p ~/logs; cd ~/maskformer_jax || exit 1; setsid nohup .venv/bin/python -m maskformer_jax.train "
      "--config configs/coco_panoptic.py:backbone=r101 --workdir gs://b/r --config.data.root=gs://b/coco "
      ">> ~/logs/train.log 2>&1 < /dev/null & echo $! > ~/logs/train.pid; echo started train on $(hostname)")
  subprocess.run(["bash", "-n", "-c", argv[-1]], check=True)


def test_train_refuses_bad_overrides_and_configs_outside_the_checkout(capsys, tmp_path):
  base = ["train", "--name", "n", "--zone", "z", "--workdir", "gs://b/r", "--dry-run"]
  for extra, message in [(["--config", DEMO, "--config.total_stepz=3"], "total_stepz"),
                         (["--config", DEMO, "--config.total_steps", "3"], "--config.KEY=VALUE"),
                         (["--config", DEMO, "--config.batch_size=big"], "batch_size")]:
    with pytest.raises(SystemExit):
      tpu.main(base + extra)
    assert message in capsys.readouterr().err
  outside = tmp_path / "mine.py"
  outside.write_text((ROOT / DEMO).read_text())
  with pytest.raises(SystemExit):
    tpu.main(base + ["--config", str(outside)])
  assert "outside this checkout" in capsys.readouterr().err


def test_tail_stop_delete_status(capsys):
  (tail,) = dry(capsys, "tail", "--name", "n", "--zone", "z", "--run-name", "r1", "--lines", "20")
  assert tail == ssh("n", "z", tail[-1])
  assert "tail -n 20 -F ~/logs/r1.log | sed -u \"s/^/[worker $w] /\"" in tail[-1]
  assert "agent-worker-number" in tail[-1]  # each worker prefixes its lines with its own number
  (one,) = dry(capsys, "tail", "--name", "n", "--zone", "z", "--worker", "3", "--no-follow")
  assert "--worker=3" in one and "tail -n 100 ~/logs/train.log" in one[-1]
  (stop,) = dry(capsys, "stop", "--name", "n", "--zone", "z")
  assert stop == ssh("n", "z", "kill -TERM $(cat ~/logs/train.pid 2>/dev/null) 2>/dev/null; "
                     "echo stopped train on $(hostname)")
  assert dry(capsys, "delete", "--name", "n", "--zone", "z") == [
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "n", "--zone=z", "--quiet"]]
  assert dry(capsys, "delete", "--name", "n", "--zone", "z", "--queued") == [
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "n", "--zone=z", "--force", "--quiet"]]
  assert dry(capsys, "status", "--name", "n", "--zone", "z", "--queued") == [
      ["gcloud", "compute", "tpus", "queued-resources", "describe", "n", "--zone=z", "--format=value(state.state)"]]


def test_run_dry_run_prints_one_launch(capsys):
  lines = dry(capsys, "run", "--name", "n", "--zone", "z", "--accelerator", "v4-8", "--queued", "--spot",
              "--config", DEMO, "--workdir", "gs://b/r")
  assert [l[1:5] if l[0] == "gcloud" else l[0] for l in lines] == [
      sys.executable, ["compute", "tpus", "queued-resources", "describe"], ["compute", "tpus", "queued-resources", "create"],
      "git", ["compute", "tpus", "tpu-vm", "scp"], ["compute", "tpus", "tpu-vm", "ssh"],
      ["compute", "tpus", "tpu-vm", "ssh"], ["compute", "tpus", "tpu-vm", "ssh"],
      ["compute", "tpus", "queued-resources", "delete"]]


def test_old_tpu_vm_script_maps_onto_tpu_py():
  env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
  out = subprocess.run(["bash", str(ROOT / "launch" / "tpu_vm.sh"), "create", "n", "z", "v4-8", "--spot",
                        "--dry-run"], capture_output=True, text=True, check=True, env=env, cwd=ROOT).stdout
  assert out.split() == ["gcloud", "compute", "tpus", "tpu-vm", "create", "n", "--zone=z",
                         "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base", "--spot"]


def test_tpu_vm_script_is_valid_bash():
  subprocess.run(["bash", "-n", str(ROOT / "launch" / "tpu_vm.sh")], check=True)


# ------------------------------------------------------------------------------------------------
# Preemption: a fake gcloud drives the watch loop.

class FakeGcloud:
  """Answers `describe` from a list of states (the last one repeats), ssh `kill -0` with alive/gone, and
  on the train ssh calls `on_train`. Records every argv."""

  def __init__(self, states, alive=("alive",), on_train=None, failed_creates=0, accelerator="v4-8"):
    self.states, self.alive, self.on_train, self.calls = list(states), list(alive), on_train, []
    self.failed_creates, self.accelerator = failed_creates, accelerator

  def __call__(self, argv, capture=False):
    self.calls.append(argv)
    out, err, rc = "", "", 0
    if any("acceleratorType" in a for a in argv):
      out = self.accelerator + "\n"
    elif "describe" in argv:
      st = self.states.pop(0) if len(self.states) > 1 else self.states[0]
      if st == "NOT_FOUND":
        rc, err = 1, "ERROR: (gcloud.compute.tpus) NOT_FOUND: Resource 'x' was not found"
      out = "" if rc else st + "\n"
    elif "create" in argv and self.failed_creates:
      self.failed_creates -= 1
      rc, err = 1, "ERROR: (gcloud.compute.tpus.tpu-vm.create) There is no more capacity in the zone"
    elif "ssh" in argv and "kill -0" in argv[-1]:
      out = (self.alive.pop(0) if len(self.alive) > 1 else self.alive[0]) + "\n"
    elif "ssh" in argv and "maskformer_jax.train" in argv[-1] and self.on_train:
      self.on_train()
    return subprocess.CompletedProcess(argv, rc, out, err)

  def count(self, *words):
    return sum(all(w in a for w in words) for a in self.calls)


class FakeCheck:
  """Stands in for `python -m maskformer_jax.bench.tpu_compile` (the pre-flight): writes its JSON report
  (fits, or not with one setting that fits) and records the argv it was given."""

  def __init__(self, fits=True):
    self.fits, self.calls = fits, []

  def __call__(self, argv):
    self.calls.append(argv)
    report = {"fits": self.fits, "per_device_bytes": (12 if self.fits else 40) * 2 ** 30,
              "hbm_bytes": int(30.75 * 2 ** 30),
              "fits_with": [] if self.fits else [{"setting": "--config.grad_accum_steps=4",
                                                 "per_device_bytes": 20 * 2 ** 30}]}
    out = next(a.partition("=")[2] for a in argv if a.startswith("--json="))
    pathlib.Path(out).write_text(json.dumps(report))
    return subprocess.CompletedProcess(argv, 0 if self.fits else 1, "", "")


@pytest.fixture(autouse=True)
def _preflight_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no results from earlier runs


def write_metrics(workdir, steps, loss=1.0, evals=(), mtime=None):
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  rows = [{"step": s, "loss": loss / s} for s in steps] + [{"step": s, "eval": "val", "pq": pq} for s, pq in evals]
  with open(workdir / "metrics.jsonl", "a") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  if mtime is not None:
    os.utime(workdir / "metrics.jsonl", (mtime, mtime))


def test_watch_recreates_reinstalls_and_restarts_once_after_preemption(tmp_path):
  workdir = tmp_path / "run"
  write_metrics(workdir, [5])
  fake = FakeGcloud(["ACTIVE", "PREEMPTED", "WAITING_FOR_RESOURCES", "ACTIVE"],
                    on_train=lambda: write_metrics(workdir, [10]))  # the restarted run resumes and finishes
  sleeps = []
  code = tpu.main(["watch", "--name", "n", "--zone", "z", "--queued", "--spot", "--accelerator", "v4-8",
                   "--config", DEMO, "--workdir", str(workdir), "--config.total_steps=10", "--poll-s", "7"],
                  runner=fake, sleep=sleeps.append, checker=FakeCheck())
  assert code == 0
  assert fake.count("queued-resources", "delete", "--force") == 1
  assert fake.count("queued-resources", "create", "--spot", "--accelerator-type=v4-8") == 1
  assert fake.count("archive") == 1 and fake.count("scp") == 1
  assert sum("ssh" in a and "pip install" in a[-1] for a in fake.calls) == 1
  assert sum("ssh" in a and "maskformer_jax.train" in a[-1] for a in fake.calls) == 1
  def kind(argv):  # a gcloud/git verb, else what the ssh script does
    return next((w for w in ("describe", "delete", "create", "archive", "scp") if w in argv), None) or \
        next(w for w in ("kill -0", "pip", "maskformer_jax.train") if w in argv[-1])
  assert [kind(a) for a in fake.calls] == ["describe", "kill -0", "describe", "delete", "create", "describe",
                                           "describe", "archive", "scp", "pip", "maskformer_jax.train"]
  assert sleeps == [7, 7, 7, 7]
  assert json.loads((workdir / "launch_status.json").read_text())["status"] == "finished"


def test_a_failed_recreation_is_tried_again_without_counting_a_new_restart(tmp_path):
  workdir = tmp_path / "run"
  write_metrics(workdir, [5])
  fake = FakeGcloud(["PREEMPTED", "NOT_FOUND", "READY"], on_train=lambda: write_metrics(workdir, [10]),
                    failed_creates=1)
  assert tpu.main(["watch", "--name", "n", "--zone", "z", "--spot", "--accelerator", "v4-8", "--config", DEMO,
                   "--workdir", str(workdir), "--config.total_steps=10", "--poll-s", "0"],
                  runner=fake, sleep=lambda s: None, checker=FakeCheck()) == 0
  assert fake.count("tpu-vm", "delete") == 1 and fake.count("tpu-vm", "create", "--spot") == 2
  assert sum("ssh" in a and "maskformer_jax.train" in a[-1] for a in fake.calls) == 1
  assert json.loads((workdir / "launch_status.json").read_text())["restarts"] == 1


def test_run_creates_a_missing_slice_and_reports_a_run_that_dies(tmp_path):
  workdir = tmp_path / "run"
  fake = FakeGcloud(["NOT_FOUND", "READY", "READY"], alive=["gone"])
  code = tpu.main(["run", "--name", "n", "--zone", "z", "--accelerator", "v4-8", "--config", DEMO,
                   "--workdir", str(workdir), "--poll-s", "0"], runner=fake, sleep=lambda s: None,
                  checker=FakeCheck())
  assert code == 1
  assert fake.count("tpu-vm", "create") == 1 and fake.count("delete") == 0
  assert sum("ssh" in a and "maskformer_jax.train" in a[-1] for a in fake.calls) == 1  # never restarted
  marker = json.loads((workdir / "launch_status.json").read_text())
  assert marker["status"] == "failed" and "exited" in marker["message"]


def test_preflight_refuses_a_config_that_does_not_fit_before_creating_anything(tmp_path, capsys):
  fake, check = FakeGcloud(["NOT_FOUND"]), FakeCheck(fits=False)
  code = tpu.main(["run", "--name", "n", "--zone", "z", "--accelerator", "v4-8", "--config", DEMO,
                   "--workdir", str(tmp_path / "run"), "--config.batch_size=64"], runner=fake,
                  sleep=lambda s: None, checker=check)
  assert code == 2 and fake.calls == []  # nothing created, nothing started
  err = capsys.readouterr().err
  assert "does not fit v4-8" in err and "40.00 GiB per device of 30.75 GiB" in err
  assert "--config.grad_accum_steps=4 (20.00 GiB)" in err and "--skip-preflight" in err
  (argv,) = check.calls
  assert argv[argv.index("--topology") + 1] == "v4-8" and "--config.batch_size=64" in argv
  # --skip-preflight starts it anyway; a config that fits starts after the check.
  fake = FakeGcloud(["NOT_FOUND", "READY"], on_train=lambda: write_metrics(tmp_path / "run", [20]))
  assert tpu.main(["run", "--name", "n", "--zone", "z", "--accelerator", "v4-8", "--config", DEMO, "--workdir",
                   str(tmp_path / "run"), "--config.total_steps=20", "--skip-preflight"], runner=fake,
                  sleep=lambda s: None, checker=check) == 0
  assert fake.count("tpu-vm", "create") == 1 and len(check.calls) == 1


def test_preflight_of_train_asks_gcloud_for_the_slice_type_and_caches_its_result(tmp_path, capsys):
  fake, check = FakeGcloud(["READY"], accelerator="v5litepod-16"), FakeCheck()
  argv = ["train", "--name", "n", "--zone", "z", "--config", DEMO, "--workdir", "gs://b/r"]
  assert tpu.main(argv, runner=fake, checker=check) == 0
  assert check.calls[0][check.calls[0].index("--topology") + 1] == "v5litepod-16"
  assert "fits v5litepod-16: 12.00 GiB of 30.75 GiB per device" in capsys.readouterr().out
  assert tpu.main(argv + ["--config.optim.base_lr=3e-4"], runner=fake, checker=check) == 0
  assert len(check.calls) == 1  # the same program (a learning rate is a number in it): checked once
  assert tpu.main(argv + ["--config.batch_size=32"], runner=fake, checker=check) == 0
  assert len(check.calls) == 2
  assert sum("maskformer_jax.train" in a[-1] for a in fake.calls if "ssh" in a) == 3


def test_state_through_a_fake_gcloud_on_path(tmp_path, monkeypatch):
  """The real subprocess runner: a `gcloud` script first on PATH answers as the real one would."""
  script = tmp_path / "gcloud"
  monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
  s = tpu.Slice("n", "z", queued=True)
  for body, expected in [("echo SUSPENDED", tpu.LOST), ("echo ACTIVE", tpu.READY),
                         ("echo PROVISIONING", tpu.PENDING),
                         ("echo 'ERROR: NOT_FOUND: Resource not found' >&2; exit 1", tpu.MISSING),
                         ("echo 'ERROR: network unreachable' >&2; exit 1", tpu.UNKNOWN)]:
    script.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\n{body}\n")
    script.chmod(0o755)
    assert tpu.state(tpu.Shell(), s) == expected, body
  assert (tmp_path / "args").read_text().split() == tpu.state_argv(s)[1:]


# ------------------------------------------------------------------------------------------------
# launch/sweep.py

def test_grid_expands_to_every_combination_with_distinct_workdirs():
  runs = sweep.plan(CONFIG, "gs://b/sweep/", ["optim.base_lr=1e-4,6e-5", "optim.weight_decay=1e-4,0.01"],
                    tpus=["a:z1", "b:z2"])
  assert len(runs) == 4
  assert [(r.tpu, r.zone) for r in runs] == [("a", "z1"), ("b", "z2"), ("a", "z1"), ("b", "z2")]
  workdirs = [r.workdir for r in runs]
  assert len(set(workdirs)) == 4 and all(w.startswith("gs://b/sweep/") for w in workdirs)
  argv = sweep.run_argv(CONFIG, runs[1])
  assert argv[2:7] == ["run", "--name", "b", "--zone", "z2"] and "--accelerator" not in argv
  assert argv[-2:] == ["--config.optim.base_lr=0.0001", "--config.optim.weight_decay=0.01"]
  assert "--delete-when-done" not in argv  # an existing TPU is not ours to delete


def test_grid_times_slices_gives_each_run_a_name_a_workdir_and_a_slice():
  runs = sweep.plan(CONFIG, "gs://b/sw", ["optim.base_lr=1e-4,6e-5", "total_steps=10,20"],
                    slices=["v4-8", "v4-32"], zone="us-central2-b")
  assert len(runs) == 8
  assert runs[0].name == "v4-8_base_lr=0.0001_total_steps=10" and runs[1].name == "v4-32_base_lr=0.0001_total_steps=10"
  assert runs[0].workdir == "gs://b/sw/v4-8_base_lr=0.0001_total_steps=10"
  assert {r.slice for r in runs} == {"v4-8", "v4-32"} and [r.total_steps for r in runs[:4]] == [10, 10, 20, 20]
  names = [r.tpu for r in runs]
  assert len(set(names)) == 8 and all(re.match(r"^[a-z][a-z0-9-]{0,62}[a-z0-9]$", n) for n in names)
  assert names[0].startswith("mf-v4-8-base-lr-0-0001")
  argv = sweep.run_argv(CONFIG, runs[0], queued=True, provisioning="spot")
  assert argv[argv.index("--accelerator") + 1] == "v4-8" and "--queued" in argv and "--spot" in argv
  assert "--delete-when-done" in argv and argv[argv.index("--run-name") + 1] == runs[0].name
  # same leaf in two sections: the names keep the full keys so they stay apart
  assert sweep.run_name({"optim.x": 1, "model.x": 2}) == "optim.x=1_model.x=2"


def test_unknown_key_or_wrong_type_fails_before_launch():
  with pytest.raises(KeyError, match="optim.base_lrr"):
    sweep.plan(CONFIG, "/tmp/w", ["optim.base_lrr=1e-4"], tpus=["a:z"])
  with pytest.raises(KeyError, match="optimizer"):
    sweep.plan(CONFIG, "/tmp/w", ["optimizer.base_lr=1e-4"], tpus=["a:z"])
  with pytest.raises(TypeError, match="batch_size"):
    sweep.plan(CONFIG, "/tmp/w", ["batch_size=big"], tpus=["a:z"])
  with pytest.raises(ValueError, match="KEY=V1"):
    sweep.expand(["optim.base_lr"])
  with pytest.raises(ValueError, match="--zone"):
    sweep.plan(CONFIG, "/tmp/w", [], slices=["v4-8"])
  with pytest.raises(ValueError, match="not both"):
    sweep.plan(CONFIG, "/tmp/w", [], slices=["v4-8"], zone="z", tpus=["a:z"])


def test_cli_prints_commands_without_launching(capsys):
  assert sweep.main(["--config", CONFIG, "--workdir-root", "/tmp/w", "--tpu", "t:z", "--grid",
                     "total_steps=10,20"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and "--config.total_steps=20" in lines[1] and "tpu.py run --name t --zone z" in lines[1]


def test_sweep_dry_run_prints_every_runs_gcloud_commands(capsys):
  assert sweep.main(["--config", DEMO, "--workdir-root", "gs://b/sw", "--slice", "v4-8", "--slice", "v6e-8",
                     "--zone", "us-east5-a", "--queued", "--spot", "--grid", "total_steps=10,20", "--dry-run"]) == 0
  out = capsys.readouterr().out
  creates = [l for l in out.splitlines() if "queued-resources create" in l]
  assert len(creates) == 4 and all("--spot" in l for l in creates)
  assert sum("--runtime-version=v2-alpha-tpuv6e" in l for l in creates) == 2
  assert out.count("maskformer_jax.train") == 4 and "gs://b/sw/sweep.json" in out


def test_sweep_launch_writes_the_manifest_and_runs_tpus_in_parallel(tmp_path, capsys):
  started = []
  def launcher(argv, log_path):
    started.append((argv[argv.index("--name") + 1], argv[argv.index("--run-name") + 1], log_path))
    time.sleep(0.05)
    return 0
  root = tmp_path / "sweep"
  assert sweep.main(["--config", DEMO, "--workdir-root", str(root), "--tpu", "a:z", "--tpu", "b:z",
                     "--grid", "total_steps=10,20,30", "--launch", "--log-dir", str(tmp_path / "logs")],
                    launcher=launcher) == 0
  data = json.loads((root / "sweep.json").read_text())
  assert [r["name"] for r in data["runs"]] == ["total_steps=10", "total_steps=20", "total_steps=30"]
  assert [r["tpu"] for r in data["runs"]] == ["a", "b", "a"]
  assert data["runs"][1]["workdir"] == f"{root}/total_steps=20" and data["runs"][1]["overrides"] == {"total_steps": 20}
  assert "tpu.py run" in data["runs"][0]["command"]
  # the two runs on TPU a one after the other, in grid order
  assert [r for t, r, _ in started if t == "a"] == ["total_steps=10", "total_steps=30"]
  assert sorted(os.path.basename(p) for *_, p in started) == [f"total_steps={n}.log" for n in (10, 20, 30)]


def test_sweep_preflight_checks_each_program_once_per_slice_type_and_launches_nothing_that_does_not_fit(
    tmp_path, capsys):
  started = []
  launcher = lambda argv, log_path: started.append(argv) or 0  # noqa: E731
  argv = ["--config", DEMO, "--workdir-root", str(tmp_path / "sweep"), "--slice", "v4-8", "--slice", "v5e-16",
          "--zone", "z", "--grid", "optim.base_lr=1e-4,2e-4,3e-4", "--launch", "--log-dir", str(tmp_path / "logs")]

  class PerSlice(FakeCheck):  # fits v5e-16, not v4-8
    def __call__(self, argv):
      self.fits = argv[argv.index("--topology") + 1] == "v5e-16"
      return super().__call__(argv)

  check = PerSlice()
  assert sweep.main(argv, launcher=launcher, checker=check) == 2
  assert started == [] and len(check.calls) == 2  # 6 runs, 2 programs x slice types: 2 compilations
  err = capsys.readouterr().err
  assert "3 of 6 runs do not fit their slices: nothing was launched" in err
  assert "v4-8_base_lr=0.0001: configs/demo.py does not fit v4-8" in err
  # A result is kept (the same program on the same slice needs no new compilation); once all fit, each
  # run's own launcher skips the check done here.
  assert sweep.main(argv, launcher=launcher, checker=FakeCheck()) == 2
  shutil.rmtree(tmp_path / "cache")
  assert sweep.main(argv, launcher=launcher, checker=FakeCheck()) == 0
  assert len(started) == 6 and all("--skip-preflight" in a for a in started)


def test_summary_of_finished_failed_running_and_not_started_runs(tmp_path, capsys):
  root, now = tmp_path / "sw", time.time()
  runs = sweep.plan(DEMO, str(root), ["optim.base_lr=1e-4,2e-4,3e-4,4e-4,5e-4"], tpus=["t:z"])
  sweep.write_manifest(str(root), sweep.manifest(DEMO, [], runs, [["x"]] * len(runs)))
  total = runs[0].total_steps
  finished, stale, running, not_started, marked = (r.workdir for r in runs)
  write_metrics(finished, range(1, total + 1), evals=[(total // 2, 40.0), (total, 38.5)])
  (pathlib.Path(finished) / "config.json").write_text(json.dumps({"total_steps": total,
                                                                  "train": {"best_metric": "val/pq"}}))
  write_metrics(stale, [1, 2], evals=[(2, 12.0)], mtime=now - 3 * 3600)  # stopped 3 h ago
  write_metrics(running, [1, 2, 3], mtime=now - 60)
  write_metrics(marked, [1], mtime=now - 60)
  tpu.write_status(marked, "failed", "the training process exited at step 1")
  rows, metrics = sweep.summarize(str(root), now=now)
  assert metrics == ["val/pq"]
  by = {r["name"]: r for r in rows}
  names = [r.name for r in runs]
  assert [by[n]["status"] for n in names] == ["finished", "failed", "running", "not started", "failed"]
  assert by[names[0]]["step"] == total and by[names[0]]["loss"] == pytest.approx(1.0 / total)
  assert by[names[1]]["step"] == 2 and "no row for 3.0 h" in by[names[1]]["note"]
  assert "exited" in by[names[4]]["note"]
  text = sweep.table(rows, metrics)
  head, *lines = text.splitlines()
  assert head.split()[:5] == ["run", "overrides", "status", "step", "loss"] and "val/pq best" in head
  assert lines[0].split()[-2:] == ["40", "38.5"] and f"{total}/{total}" in lines[0]
  assert "optim.base_lr=0.0001" in lines[0] and lines[3].split()[-2:] == ["-", "-"]
  plot = tmp_path / "pq.png"
  assert sweep.main(["summary", "--workdir-root", str(root), "--plot", str(plot)]) == 0
  assert plot.stat().st_size > 1000 and "not started" in capsys.readouterr().out


def test_summary_without_a_manifest_finds_the_runs(tmp_path):
  write_metrics(tmp_path / "a", [1, 2], evals=[(2, 5.0)])
  (tmp_path / "a" / "config.json").write_text(json.dumps({"total_steps": 2}))
  rows, metrics = sweep.summarize(str(tmp_path))
  assert [(r["name"], r["status"]) for r in rows] == [("a", "finished")] and metrics == ["val/pq"]


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
  """Every notebook's code cells parse (shell and magic lines aside) and every config its cells name, code
  or text, loads. tests/test_notebooks.py runs them."""
  import ast
  import json
  names = set()
  notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
  assert {p.name for p in notebooks} >= {"quickstart.ipynb", "inference.ipynb"}
  for path in notebooks:
    for cell in json.loads(path.read_text())["cells"]:
      src = "".join(cell["source"])
      if cell["cell_type"] == "code":
        python = "\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("!", "%", "--")))
        ast.parse(python, str(path))
      names.update(_named_configs(src.replace("`", " ")))
  assert {"configs/demo.py", "configs/coco_panoptic.py"} <= names, names
  for name in names:
    _check_loads(name)


def test_readme_and_launch_scripts_name_real_configs():
  texts = [(ROOT / f).read_text() for f in ("README.md", "launch/tpu_vm.sh", "launch/tpu.py", "launch/sweep.py")]
  names = [n for t in texts for n in _named_configs(t)]
  assert "configs/coco_panoptic.py:backbone=r101" in names and "configs/demo.py" in names
  for name in names:
    _check_loads(name)
