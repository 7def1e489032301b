#!/usr/bin/env bash
# One host, all its GPUs (data parallel over a 1-D 'data' mesh, bfloat16 compute).
#   launch/gpu_single_host.sh 300w runs/300w [--config.student_loss=kd ...]
# The dataset must be prepared first: python -m kd_landmarks.datasets prepare --dataset 300w --manual_dir M
#   --data_dir runs/300w/data   (or pass --config.data_dir=...).
set -euo pipefail
dataset="${1:?usage: $0 DATASET WORKDIR [overrides...]}"
workdir="${2:?usage: $0 DATASET WORKDIR [overrides...]}"
shift 2
cd "$(dirname "$0")/.."
# Let XLA take GPU memory as it needs it rather than 75% up front (the host pipeline shares the machine).
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
exec python -m kd_landmarks.main --config "configs/${dataset}.py:platform=gpu" --workdir "${workdir}" "$@"
