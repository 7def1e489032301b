#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one script, for a machine with an NVIDIA GPU. It changes to
# the repository root itself; relative RESULTS_DIR, WORK_DIR and WHEELS are taken from where it is started.
#   bash benchmarks/gpu_session.sh [STEP ...]          results in RESULTS_DIR (default ./gpu_results)
# Steps, in order of importance, each under its own time limit (415 s together); name steps to run only
# those, e.g. `bash benchmarks/gpu_session.sh rehearsal_b256`:
#   student_b256     benchmarks/models.py, MobileNetV2 train step, bf16, batch 256
#   rehearsal_paper  benchmarks/pipeline.py --scale full: the whole 300W pipeline at the paper's batches
#                    (40 / 70) on synthetic faces, every phase timed, input wait, the full run projected
#   rehearsal_b256   the same at global batch 256 for every model, reading the splits decoded once into
#                    memory (--source memory), plus the decode costs (--decode)
#   profile          (only when named) jax.profiler traces of the student's timed steps, as one .tgz
# Results: RESULTS_DIR/session.log (one line per step), env.log, <step>.log and <step>.json.
# Without a package index on the GPU machine: fetch the missing packages elsewhere with
# benchmarks/gpu_wheels.sh into .whl/ and copy the folder along; this script installs them (WHEELS=DIR to
# point elsewhere) into a private site directory with --no-index --no-deps.
# Environment: RESULTS_DIR, PYTHON (python3), PLATFORM (gpu), SCALE (full), WHEELS (.whl), WORK_DIR (scratch
# for the prepared data, the workdirs and the installed wheels, kept between runs so that one step can be
# rerun without preparing the data again; default ${TMPDIR:-/tmp}/kd_gpu_work), LIMIT_FACTOR (1; stretches
# every limit). Rehearse the script itself on a CPU (the plumbing, not the figures):
#   PLATFORM=cpu SCALE=tiny LIMIT_FACTOR=5 PYTHON=.venv/bin/python RESULTS_DIR=/tmp/o \
#     bash benchmarks/gpu_session.sh rehearsal_paper
set -uo pipefail
# Relative paths are taken from where the script is started, before it moves to the repository root.
RESULTS_DIR="$(mkdir -p "${RESULTS_DIR:-./gpu_results}" && cd "${RESULTS_DIR:-./gpu_results}" && pwd)" \
  || { echo "cannot create RESULTS_DIR=${RESULTS_DIR:-./gpu_results}" >&2; exit 1; }
WORK_DIR="$(mkdir -p "${WORK_DIR:-${TMPDIR:-/tmp}/kd_gpu_work}" && cd "${WORK_DIR:-${TMPDIR:-/tmp}/kd_gpu_work}" && pwd)" \
  || { echo "cannot create WORK_DIR" >&2; exit 1; }
if [ -n "${WHEELS:-}" ]; then WHEELS="$(cd "${WHEELS}" 2>/dev/null && pwd || echo "${WHEELS}")"; fi
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-.whl}"   # Default: the repository's .whl/ (benchmarks/gpu_wheels.sh).
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
# XLA may take GPU memory as it needs it: the device peak then shows what each phase really holds.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PYTHON="${PYTHON:-python3}" PLATFORM="${PLATFORM:-gpu}" SCALE="${SCALE:-full}"
if [ -d "${WHEELS}" ]; then
  "${PYTHON}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "${WORK_DIR}/site" "${WHEELS}"/*.whl \
    || { echo "installing ${WHEELS}/*.whl failed" | tee -a "${RESULTS_DIR}/session.log"; exit 1; }
  export PYTHONPATH="${WORK_DIR}/site:${PWD}"
else
  export PYTHONPATH="${PWD}"
fi
data="${WORK_DIR}/data"   # The synthetic 300W-sized set, prepared once, shared by the rehearsals.

log() { echo "[$(date -u +%T) +${SECONDS}s] $*" | tee -a "${RESULTS_DIR}/session.log"; }
step() {  # step NAME LIMIT_S COMMAND...  (LIMIT_FACTOR stretches every limit, e.g. for a rehearsal on a CPU)
  local name=$1 limit=$(( $2 * ${LIMIT_FACTOR:-1} ))
  shift 2
  log "start ${name} (limit ${limit} s): $*"
  timeout --kill-after=10 "${limit}" "$@" > "${RESULTS_DIR}/${name}.log" 2>&1
  log "end ${name}: rc $?"
  grep -E "img/s|\[projection\]|^  |total|decode|rehearsal\]|Error|error" "${RESULTS_DIR}/${name}.log" | tail -n 30
}
steps=("$@")
run_step() { [ ${#steps[@]} -eq 0 ] && [ "$1" != profile ] && return 0; printf '%s\n' "${steps[@]}" | grep -qx "$1"; }

{ date -u; git rev-parse HEAD 2>/dev/null || echo "commit unknown"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "${PYTHON}" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"; nproc; } > "${RESULTS_DIR}/env.log" 2>&1
cat "${RESULTS_DIR}/env.log"

if run_step student_b256; then
  step student_b256 75 "${PYTHON}" benchmarks/models.py --platform "${PLATFORM}" --dtype bfloat16 --batch 256 --models student \
    --iterations 30 --peers ""
fi
if run_step rehearsal_paper; then
  step rehearsal_paper 210 "${PYTHON}" benchmarks/pipeline.py --scale "${SCALE}" --dataset 300w --platform "${PLATFORM}" \
    --data_dir "${data}" --workdir "${WORK_DIR}/rehearsal" --out "${RESULTS_DIR}/rehearsal_paper.json"
fi
if run_step rehearsal_b256; then
  step rehearsal_b256 130 "${PYTHON}" benchmarks/pipeline.py --scale "${SCALE}" --dataset 300w --platform "${PLATFORM}" --batch 256 \
    --steps 20 --source memory --decode --data_dir "${data}" --workdir "${WORK_DIR}/rehearsal_b256" \
    --out "${RESULTS_DIR}/rehearsal_b256.json"
fi
if run_step profile; then
  step profile 150 "${PYTHON}" benchmarks/pipeline.py --scale "${SCALE}" --dataset 300w --platform "${PLATFORM}" --batch 256 \
    --steps 10 --data_dir "${data}" --workdir "${WORK_DIR}/rehearsal_profile" --profile_dir "${WORK_DIR}/profile"
  tar czf "${RESULTS_DIR}/profile.tgz" -C "${WORK_DIR}" profile 2>/dev/null && ls -l "${RESULTS_DIR}/profile.tgz"
fi
log "done; results in ${RESULTS_DIR}"
