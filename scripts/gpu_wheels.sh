#!/usr/bin/env bash
# Prepare, on a machine with network, the wheels the GPU check needs on a GPU machine that has none:
#
#   scripts/gpu_wheels.sh [DIR]          # DIR: default .whl (git ignores it)
#
# The GPU machine this project is lent (README: "The GPU check") has Python 3.12 and its own torch,
# transformers, huggingface_hub, accelerate, pyarrow, fsspec, safetensors, tokenizers, numpy, tqdm, ninja,
# psutil, py-cpuinfo and msgpack, and no network. What it lacks, or has in a version this project does not
# run with, travels as wheels for CPython 3.12 on manylinux x86_64:
#   - deepspeed, built here into a wheel without compiled ops (they are built just in time on the GPU),
#     with its missing needs hjson and pydantic (pydantic-core, annotated-types, typing-inspection);
#   - datasets, with dill and multiprocess;
#   - transformers and peft at our pins (the machine's transformers 5.17 predates the API we use).
# Versions are this environment's (pip install -r requirements.txt first), so the GPU runs what CI tests.
# Prints the total size; fails past 40 MiB, the share of the 64 MiB that travels to the machine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIR=${1:-.whl}
PYTHON=${PYTHON:-python}
LIMIT_MIB=40
# Binary wheels: the machine's glibc is recent, so any of these manylinux tags runs there.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
WHEELS=(hjson pydantic pydantic-core annotated-types typing-inspection datasets dill multiprocess transformers peft)

version_here() {
    "$PYTHON" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null || {
        echo "gpu_wheels: $1 is not installed here: run pip install -r requirements.txt first" >&2
        exit 2
    }
}

rm -rf "$DIR"
mkdir -p "$DIR"
specs=()
for name in "${WHEELS[@]}"; do
    specs+=("$name==$(version_here "$name")")
done
platform_args=()
for platform in "${PLATFORMS[@]}"; do
    platform_args+=(--platform "$platform")
done
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp "${platform_args[@]}" -d "$DIR" "${specs[@]}"

# DeepSpeed publishes no wheel: build one from its source release, with no op compiled (DS_BUILD_OPS=0).
# Its setup imports torch, so it builds against this environment's torch, without build isolation.
deepspeed=$(version_here deepspeed)
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    -w "$DIR" "deepspeed==$deepspeed"

ls -1 "$DIR"
total=$(du -cb "$DIR"/*.whl | tail -n 1 | cut -f 1)
echo "gpu_wheels: $(ls "$DIR"/*.whl | wc -l) wheels, $(awk "BEGIN { printf \"%.1f\", $total / 1048576 }") MiB in $DIR"
if ((total > LIMIT_MIB * 1048576)); then
    echo "gpu_wheels: over the ${LIMIT_MIB} MiB that may travel with the repository" >&2
    exit 1
fi
