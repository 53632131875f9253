#!/usr/bin/env bash
# The deepspeed launcher; with HOSTFILE set it spans the hosts listed there ("host slots=8" lines).
#   NPROC=2 launch/deepspeed.sh configs/deepspeed_zero2.yaml
#   HOSTFILE=hosts.txt launch/deepspeed.sh configs/deepspeed_zero2.yaml
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ -n "${HOSTFILE:-}" ]; then
  exec deepspeed --hostfile "$HOSTFILE" --module moe_dist.train "$@" engine=deepspeed
fi
exec deepspeed --num_gpus "${NPROC:-2}" --module moe_dist.train "$@" engine=deepspeed
