#!/usr/bin/env bash
# The earlier positional interface, kept so that existing notes and scripts still work: each line maps onto
# launch/tpu.py, which has every option (queued resources, --spot, tail, restart after preemption, --dry-run).
#
#   launch/tpu_vm.sh create NAME ZONE ACCELERATOR [RUNTIME]   # e.g. my-v4 us-central2-b v4-32
#   launch/tpu_vm.sh setup  NAME ZONE                         # ship this checkout, install on all workers
#   launch/tpu_vm.sh train  NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_vm.sh tail   NAME ZONE                         # every worker's log, lines prefixed
#   launch/tpu_vm.sh stop   NAME ZONE                         # SIGTERM: the run saves and exits
#   launch/tpu_vm.sh delete NAME ZONE
#
# Flags of launch/tpu.py may follow (e.g. --dry-run, --spot).
# e.g. launch/tpu_vm.sh train my-v4 us-central2-b configs/coco_panoptic.py:backbone=r101 gs://bucket/runs/r101
# WORKDIR should be a gs:// path so that checkpoints outlive the VM; the same train command resumes.
set -euo pipefail

usage() { sed -n '2,14p' "$0"; exit 2; }
[ $# -ge 3 ] || usage
cmd=$1 name=$2 zone=$3
shift 3
tpu() { exec "${PYTHON:-python3}" "$(dirname "$0")/tpu.py" "$@"; }

case "$cmd" in
  create)
    [ $# -ge 1 ] || usage
    accel=$1
    shift
    if [ $# -ge 1 ] && [ "${1#--}" = "$1" ]; then set -- --runtime-version "$@"; fi
    tpu create --name "$name" --zone "$zone" --accelerator "$accel" "$@" ;;
  setup|tail|stop|delete|status)
    tpu "$cmd" --name "$name" --zone "$zone" "$@" ;;
  train)
    [ $# -ge 2 ] || usage
    config=$1 workdir=$2
    shift 2
    tpu train --name "$name" --zone "$zone" --config "$config" --workdir "$workdir" "$@" ;;
  *) usage ;;
esac
