#!/usr/bin/env bash
# Create a TPU VM (single host or pod slice), install maskformer_jax on every worker, and run training there.
#
#   launch/tpu_vm.sh create NAME ZONE ACCELERATOR [RUNTIME]   # e.g. my-v4 us-central2-b v4-32
#   launch/tpu_vm.sh setup  NAME ZONE                         # copy this checkout, install on all workers
#   launch/tpu_vm.sh train  NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_vm.sh stop   NAME ZONE                         # stop the run (SIGTERM: it saves and exits)
#   launch/tpu_vm.sh delete NAME ZONE
#
# Every worker of a pod slice runs the same command; jax.distributed.initialize() finds the others. WORKDIR
# should be a gs:// path so that checkpoints outlive the VM; a preempted run restarted with the same
# command resumes from its last checkpoint.
set -euo pipefail

usage() { sed -n '2,12p' "$0"; exit 2; }
[ $# -ge 3 ] || usage
cmd=$1 name=$2 zone=$3
shift 3
ssh_all() { gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"; }

case "$cmd" in
  create)
    [ $# -ge 1 ] || usage
    accel=$1 runtime=${2:-}
    if [ -z "$runtime" ]; then
      case "$accel" in
        v5litepod-*) runtime=v2-alpha-tpuv5-lite ;;
        v5p-*) runtime=v2-alpha-tpuv5 ;;
        v6e-*) runtime=v2-alpha-tpuv6e ;;
        *) runtime=tpu-ubuntu2204-base ;;
      esac
    fi
    gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accel" --version="$runtime"
    ;;
  setup)
    repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
    tarball=$(mktemp --suffix=.tar.gz)
    git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
    gcloud compute tpus tpu-vm scp "$tarball" "$name":maskformer_jax.tar.gz --zone="$zone" --worker=all
    ssh_all 'set -e; rm -rf maskformer_jax && mkdir maskformer_jax && tar -xzf maskformer_jax.tar.gz -C maskformer_jax
      cd maskformer_jax && python3 -m venv .venv && .venv/bin/pip install -q -U pip
      .venv/bin/pip install -q -e . "jax[tpu]"'
    rm -f "$tarball"
    ;;
  train)
    [ $# -ge 2 ] || usage
    config=$1 workdir=$2
    shift 2
    overrides=$(printf ' %q' "$@")
    # nohup + setsid: the run survives the ssh session; its log stays on each worker.
    ssh_all "cd maskformer_jax && setsid nohup .venv/bin/python -m maskformer_jax.train --config $config \
      --workdir $workdir$overrides > train.log 2>&1 < /dev/null & echo started on \$(hostname)"
    ;;
  stop)
    ssh_all "pkill -TERM -f maskformer_jax.train || true"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
    ;;
  *) usage ;;
esac
