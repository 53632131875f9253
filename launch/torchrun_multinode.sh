#!/usr/bin/env bash
# Multi-node with c10d rendezvous; run the same line on every node.
#   NNODES=2 NPROC=8 RDZV_ENDPOINT=node0:29500 RUN_ID=exp1 launch/torchrun_multinode.sh configs/gpu_8x_nccl.yaml
set -euo pipefail
: "${NNODES:?set NNODES}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of node 0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec torchrun --nnodes "$NNODES" --nproc-per-node "${NPROC:-8}" --rdzv-backend c10d \
  --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RUN_ID:-moe_dist}" -m moe_dist.train "$@"
