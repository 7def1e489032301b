#!/usr/bin/env bash
# Every GPU measurement of issue 15 in one call on the lent H200 (device tool `run`, repository root):
#   command: bash benchmarks/gpu_session.sh          timeout_s: 480   carry: [".whl"]
# (.whl from benchmarks/gpu_wheels.sh). Steps, in order of importance, each under its own time limit
# (415 s together, leaving time in the 15-minute device budget for the machine's start and one rerun);
# name steps to run only those, e.g. `bash benchmarks/gpu_session.sh rehearsal_b256`:
#   student_b256     benchmarks/models.py, MobileNetV2 train step, bf16, batch 256 (target >= 15,000 img/s;
#                    9,864 measured in the first session, before BatchNormAct)
#   rehearsal_paper  benchmarks/pipeline.py --scale full: the whole 300W pipeline at the paper's batches
#                    (40 / 70), every phase timed, input wait, the full run projected (target <= 20 min)
#   rehearsal_b256   the same at global batch 256 for every model (teacher target >= 3,000 img/s), reading the
#                    splits decoded once into memory (--source memory), plus the decode costs (--decode)
#   profile          (only when named) jax.profiler traces of the student's timed steps, as one .tgz
# Results: $OUT/session.log (one line per step), env.log, <step>.log and <step>.json (8 files at most).
# Rehearse the script itself on a CPU (the plumbing, not the figures):
#   PLATFORM=cpu SCALE=tiny LIMIT_FACTOR=5 PYTHON=.venv/bin/python WHEELS=/path/to/wheels OUT=/tmp/o \
#     bash benchmarks/gpu_session.sh rehearsal_paper
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/kd_gpu_out}"
mkdir -p "${OUT}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
# XLA may take GPU memory as it needs it: the device peak then shows what each phase really holds.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PYTHON="${PYTHON:-python3}" PLATFORM="${PLATFORM:-gpu}" SCALE="${SCALE:-full}" WHEELS="${WHEELS:-.whl}"
if [ -d "${WHEELS}" ]; then
  "${PYTHON}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS}"/*.whl \
    || { echo "installing .whl failed" | tee -a "${OUT}/session.log"; exit 1; }
  export PYTHONPATH="/tmp/site:${PWD}"
else
  export PYTHONPATH="${PWD}"
fi
data=/tmp/kd_data   # The synthetic 300W-sized set, prepared once, shared by the rehearsals.

log() { echo "[$(date -u +%T) +${SECONDS}s] $*" | tee -a "${OUT}/session.log"; }
step() {  # step NAME LIMIT_S COMMAND...  (LIMIT_FACTOR stretches every limit, e.g. for a rehearsal on a CPU)
  local name=$1 limit=$(( $2 * ${LIMIT_FACTOR:-1} ))
  shift 2
  log "start ${name} (limit ${limit} s): $*"
  timeout --kill-after=10 "${limit}" "$@" > "${OUT}/${name}.log" 2>&1
  log "end ${name}: rc $?"
  grep -E "img/s|\[projection\]|^  |total|decode|rehearsal\]|Error|error" "${OUT}/${name}.log" | tail -n 30
}
steps=("$@")
run_step() { [ ${#steps[@]} -eq 0 ] && [ "$1" != profile ] && return 0; printf '%s\n' "${steps[@]}" | grep -qx "$1"; }

{ date -u; git rev-parse HEAD 2>/dev/null || echo "commit unknown"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "${PYTHON}" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"; nproc; } > "${OUT}/env.log" 2>&1
cat "${OUT}/env.log"

if run_step student_b256; then
  step student_b256 75 "${PYTHON}" benchmarks/models.py --platform "${PLATFORM}" --dtype bfloat16 --batch 256 --models student \
    --iterations 30 --peers ""
fi
if run_step rehearsal_paper; then
  step rehearsal_paper 210 "${PYTHON}" benchmarks/pipeline.py --scale "${SCALE}" --dataset 300w --platform "${PLATFORM}" \
    --data_dir "${data}" --workdir /tmp/kd_rehearsal --out "${OUT}/rehearsal_paper.json"
fi
if run_step rehearsal_b256; then
  step rehearsal_b256 130 "${PYTHON}" benchmarks/pipeline.py --scale "${SCALE}" --dataset 300w --platform "${PLATFORM}" --batch 256 \
    --steps 20 --source memory --decode --data_dir "${data}" --workdir /tmp/kd_rehearsal_b256 \
    --out "${OUT}/rehearsal_b256.json"
fi
if run_step profile; then
  step profile 150 "${PYTHON}" benchmarks/pipeline.py --scale "${SCALE}" --dataset 300w --platform "${PLATFORM}" --batch 256 \
    --steps 10 --data_dir "${data}" --workdir /tmp/kd_rehearsal_profile --profile_dir /tmp/kd_profile
  tar czf "${OUT}/profile.tgz" -C /tmp kd_profile 2>/dev/null && ls -l "${OUT}/profile.tgz"
fi
log "session done"
