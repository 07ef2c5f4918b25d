#!/usr/bin/env bash
# The CUDA path, measured, in one go on a GPU machine with this repository and no network:
#
#   scripts/gpu_wheels.sh                  # here, with network: the wheels the GPU machine lacks -> .whl/
#   scripts/gpu_check.sh [OUT_DIR [ARGS]]  # there; OUT_DIR: default $OUT if set, else ./gpu_check; ARGS go
#                                          # to python -m bench.gpu_check (--tests_s 150 ...)
#   scripts/gpu_check.sh --cpu-rehearsal [OUT_DIR]   # on CPU: the same installs, then a step of each stage
#                                                    # (scripts/gpu_rehearsal.sh sets up a machine-like venv)
#
# 1. prints the versions of what the machine already has (its own torch is the one used);
# 2. installs the prepared wheels (WHEELS, default .whl) with pip --no-index --no-deps into a folder put
#    first on PYTHONPATH: nothing is fetched, nothing of the machine's own installation changes;
# 3. python -m bench.gpu_check: the GPU-marked tests (pytest -m gpu), the launcher on the GPU with a
#    resume, and bench at the Qwen3-1.7B shape, each under its own time limit and each whatever became
#    of the others; OUT_DIR/gpu_report.json and OUT_DIR/gpu_report.txt (also printed), logs beside them.
#
# About 5 minutes on one H100-class GPU. Exit status 0 when every part passed. On a machine without
# CUDA (or with CUDA_VISIBLE_DEVICES empty) it prints one line saying so and exits 0.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$PWD
MODE=()
if [[ ${1:-} == --cpu-rehearsal ]]; then
    MODE=(--cpu-rehearsal)
    shift
fi
OUT_DIR=${1:-${OUT:-./gpu_check}}
shift $(($# > 0))  # what follows OUT_DIR goes to bench.gpu_check (--tests_s, --launcher_s, ...)
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/clara_gpu_site}
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=$(command -v python || command -v python3) || { echo "gpu_check: neither python nor python3 found"; exit 2; }
fi
TOTAL_S=${TOTAL_S:-300}  # the whole check: about 5 minutes

no_cuda() {
    echo "gpu_check: no CUDA device ($1): nothing to check"
    exit 0
}

if [[ ${#MODE[@]} == 0 && ${CUDA_VISIBLE_DEVICES+set} == set && ( -z $CUDA_VISIBLE_DEVICES || $CUDA_VISIBLE_DEVICES == -1 ) ]]; then
    no_cuda "CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES}' hides every GPU"
fi
if [[ ${#MODE[@]} == 0 ]] && ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    # No driver tool listing a GPU: ask torch, where it is installed already.
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
        no_cuda "nvidia-smi lists no GPU and torch sees none"
    fi
fi

mkdir -p "$OUT_DIR" || exit 2
machine=$("$PYTHON" -m pip show torch transformers peft pyarrow fsspec huggingface_hub datasets deepspeed 2>/dev/null |
    awk '/^Name:/ { name = $2 } /^Version:/ { printf "%s %s, ", name, $2 }')
echo "gpu_check: $("$PYTHON" --version 2>&1) at $PYTHON; the machine has: ${machine%, }" >&2

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    rm -rf "$SITE"
    if "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile \
        --no-cache-dir --target "$SITE" "$WHEELS"/*.whl >"$OUT_DIR/pip_wheels.log" 2>&1; then
        installs="installed from $WHEELS into $SITE: $(cd "$WHEELS" && ls -1 *.whl | sed 's/-py.*//; s/-cp.*//' | paste -sd ' ')"
    else
        installs="installing $WHEELS failed (log: pip_wheels.log): $(tail -n 1 "$OUT_DIR/pip_wheels.log")"
    fi
else
    installs="no wheels in $WHEELS (scripts/gpu_wheels.sh prepares them): the machine's packages as they are"
fi
echo "gpu_check: $installs" >&2
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
# This Python's own commands (torchrun) come first, as its virtual environment would have them.
export PATH="$(dirname "$PYTHON"):$PATH" PYTHON

"$PYTHON" -m bench.gpu_check "${MODE[@]}" --out "$OUT_DIR" --installs "$installs
machine: ${machine%, }" --budget_s $((TOTAL_S - SECONDS)) "$@"
