#!/usr/bin/env bash
# The GPU check rehearsed on CPU, in a virtual environment set up like the GPU machine's (README: "The GPU
# check"): Python 3.12, torch 2.11 and the machine's documented packages at its versions, none of
# requirements.txt; then scripts/gpu_check.sh --cpu-rehearsal installs the prepared wheels the way it does
# there and steps each stage once. Outside the test suite: it downloads torch 2.11 (CUDA build, about 3 GB
# with its libraries; it runs on CPU) the first time.
#
#   scripts/gpu_wheels.sh && scripts/gpu_rehearsal.sh [VENV_DIR] [OUT_DIR]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${1:-/tmp/clara-gpu-rehearsal-venv}
OUT_DIR=${2:-./gpu_rehearsal}
PYTHON312=${PYTHON312:-$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12}
# As read on the GPU machine (README: "The GPU check"); pyarrow, fsspec and peft versions there are not
# documented: older ones than our pins are taken, so that the rehearsal errs on the old side.
MACHINE_PACKAGES=(torch==2.11.0 transformers==5.17.0 huggingface_hub==1.33.0 accelerate==1.15.0 safetensors==0.8.0
    tokenizers==0.23.2 numpy==2.5.2 pyarrow==23.0.1 fsspec==2026.9.0 peft==0.17.1 pytest pytest-timeout tqdm ninja
    py-cpuinfo psutil msgpack einops pandas xxhash requests)
NOT_ON_MACHINE=(pydantic pydantic-core annotated-types typing-inspection datasets deepspeed hjson dill multiprocess)

if [[ ! -x $VENV/bin/python ]]; then
    "$PYTHON312" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${MACHINE_PACKAGES[@]}"
# What those pulled in that the machine does not have goes again, so only the carried wheels provide it.
"$VENV/bin/python" -m pip uninstall --quiet --disable-pip-version-check -y "${NOT_ON_MACHINE[@]}" 2>/dev/null || true
PYTHON="$VENV/bin/python" scripts/gpu_check.sh --cpu-rehearsal "$OUT_DIR"
