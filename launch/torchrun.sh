#!/usr/bin/env bash
# Single node: NPROC ranks (GPUs, or CPU processes with gloo).
#   NPROC=4 launch/torchrun.sh configs/cpu_demo.yaml [key.sub=value ...]
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # why: ranks share the cores; more threads oversubscribe
exec torchrun --standalone --nproc-per-node "${NPROC:-4}" -m moe_dist.train "$@"
