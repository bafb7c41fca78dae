#!/usr/bin/env bash
# One node, NPROC ranks (GPUs: NCCL; CPU: gloo).
#   launch/torchrun_single_node.sh configs/tiny_fssdp.yaml [--set key=value ...]
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [--set key=value ...]}; shift
if command -v nvidia-smi >/dev/null 2>&1; then
  DEFAULT_NPROC=$(nvidia-smi -L | wc -l)
else
  DEFAULT_NPROC=2
fi
NPROC=${NPROC:-$DEFAULT_NPROC}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$(dirname "$0")/.."
# Safe import path: workers never import modules from the working directory (python -P);
# the repository is put on the path explicitly instead.
export PYTHONSAFEPATH=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec torchrun --standalone --nproc_per_node="$NPROC" -m hecate.train "$CONFIG" "$@"
