#!/usr/bin/env bash
# Several nodes: run this on every node with the same MASTER_ADDR / MASTER_PORT / NNODES.
#   MASTER_ADDR=node0 NNODES=2 NPROC=8 launch/torchrun_multi_node.sh configs/demo.yaml --set train.steps=1000
# NODE_RANK (optional) is passed as --node-rank; the c10d rendezvous assigns ranks node by node either way.
# tests/test_launch_two_node.py runs it twice on 127.0.0.1 (NNODES=2 NPROC=1) in CI.
# Ranks are node-major (rank = node * NPROC + local rank), which is what hecate's Topology expects.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [--set key=value ...]}; shift
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${NNODES:?set NNODES}
NPROC=${NPROC:-8}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$(dirname "$0")/.."
# Safe import path: workers never import modules from the working directory (python -P);
# the repository is put on the path explicitly instead.
export PYTHONSAFEPATH=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" ${NODE_RANK:+--node_rank="$NODE_RANK"} \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-hecate}" \
  -m hecate.train "$CONFIG" "$@"
