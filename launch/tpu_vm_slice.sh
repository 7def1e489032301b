#!/usr/bin/env bash
# A Cloud TPU VM pod slice: the same command on every worker; JAX finds its peers from the TPU metadata
# (parallel.initialize_distributed sees TPU_WORKER_HOSTNAMES and calls jax.distributed.initialize()).
#   launch/tpu_vm_slice.sh TPU_NAME ZONE 300w /mnt/shared/runs/300w [overrides...]
# Requirements: the repository and its virtualenv at the same path (REPO) on every worker, and WORKDIR on a
# filesystem every worker sees (Filestore/NFS or a gcsfuse mount): checkpoints and the teacher cache are
# shared, process 0 writes model.json, eval files and the report.
set -euo pipefail
tpu="${1:?usage: $0 TPU_NAME ZONE DATASET WORKDIR [overrides...]}"
zone="${2:?}"
dataset="${3:?}"
workdir="${4:?}"
shift 4
repo="${REPO:-\$HOME/kd_landmarks}"
extra="$*"
gcloud compute tpus tpu-vm ssh "${tpu}" --zone "${zone}" --worker=all --command \
  "cd ${repo} && source .venv/bin/activate && python -m kd_landmarks.main \
   --config configs/${dataset}.py:platform=tpu --workdir ${workdir} ${extra}"
