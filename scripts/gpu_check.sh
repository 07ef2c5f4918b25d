#!/usr/bin/env bash
# The CUDA path, measured (issue 14), in one go on a GPU machine with this repository:
#
#   scripts/gpu_check.sh [OUT_DIR]        # OUT_DIR: default $OUT if set, else ./gpu_check
#
# 1. installs what requirements.txt pins (nothing to fetch when it is already there) and, wheel only,
#    flash-attn from requirements-gpu.txt (building it from source takes too long: without a wheel the
#    check uses SDPA and says so);
# 2. python -m bench.gpu_check: the GPU-marked tests (pytest -m gpu), the launcher on the GPU with a resume,
#    and bench at the Qwen3-1.7B shape, each under its own time limit and each whatever became of the others;
# 3. OUT_DIR/gpu_report.json and OUT_DIR/gpu_report.txt (also printed), with the logs beside them.
#
# About 7 minutes on one H100. Exit status 0 when every part passed. On a machine without CUDA (or with
# CUDA_VISIBLE_DEVICES empty) it prints one line saying so and exits 0.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT_DIR=${1:-${OUT:-./gpu_check}}
PYTHON=${PYTHON:-python}
INSTALL_LIMIT_S=${INSTALL_LIMIT_S:-150}
FLASH_ATTN_LIMIT_S=${FLASH_ATTN_LIMIT_S:-60}
TOTAL_S=${TOTAL_S:-460}  # the whole check, installs included: under 8 minutes

no_cuda() {
    echo "gpu_check: no CUDA device ($1): nothing to check"
    exit 0
}

if [[ ${CUDA_VISIBLE_DEVICES+set} == set && ( -z $CUDA_VISIBLE_DEVICES || $CUDA_VISIBLE_DEVICES == -1 ) ]]; then
    no_cuda "CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES}' hides every GPU"
fi
if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    # No driver tool listing a GPU: ask torch, where it is installed already.
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
        no_cuda "nvidia-smi lists no GPU and torch sees none"
    fi
fi

mkdir -p "$OUT_DIR" || exit 2
# install LIMIT LOG ARGS...: pip install under a time limit; prints one line saying how it went.
install() {
    local limit=$1 log=$2
    shift 2
    # Few retries and a short socket timeout: a machine without network fails fast instead of waiting.
    local status=0
    timeout "$limit" "$PYTHON" -m pip install --disable-pip-version-check --retries 1 --timeout 10 "$@" \
        >"$OUT_DIR/$log" 2>&1 || status=$?
    if ((status == 0)); then
        echo "pip install $*: done (log: $log)"
    elif ((status == 124)); then
        echo "pip install $*: stopped after ${limit} s, going on with what is installed (log: $log)"
    else
        echo "pip install $*: failed (exit $status), going on with what is installed (log: $log): $(tail -n 1 "$OUT_DIR/$log")"
    fi
}
installs=$(
    install "$INSTALL_LIMIT_S" pip_requirements.log -r requirements.txt
    install "$FLASH_ATTN_LIMIT_S" pip_flash_attn.log --no-build-isolation --only-binary :all: -r requirements-gpu.txt
)
printf '%s\n' "$installs" >&2

"$PYTHON" -m bench.gpu_check --out "$OUT_DIR" --installs "$installs" --budget_s $((TOTAL_S - SECONDS))
