#!/usr/bin/env bash
# Train one CLaRa stage on one GPU, or on the CPU of a machine without CUDA (built-in tiny model).
#
#   ./train_single_gpu.sh                                    # stage1 on example/pretrain_data.jsonl
#   STAGE=stage1_2 PRETRAIN_CHECKPOINT=./checkpoints/clara_stage1 ./train_single_gpu.sh
#   STAGE=stage2 PRETRAIN_CHECKPOINT=./checkpoints/clara_stage1_2 ./train_single_gpu.sh
#   ./train_single_gpu.sh --max_steps 20                     # extra arguments go to python -m clara.train
#   DRY_RUN=true ./train_single_gpu.sh                       # print the command, run nothing
#
# Every setting is an environment variable: the trainer's flags in upper case and the process settings,
# empty meaning unset; `--help` lists them all with their defaults (the trainer's, and this script's
# below). Settings are checked before anything starts (exit 2 and one line naming the bad one). Output
# is also appended to $SAVE_PATH/train.log. Re-running the same command resumes from the newest
# checkpoint (RESUME=auto).
set -euo pipefail
set -a # this script's defaults reach python -m clara.launch, which resolves and checks every setting

# This script's defaults; every other setting has the trainer's (python -m clara.train --help)
: "${BATCH_SIZE:=}"                   # global batch (samples per optimizer step); unset: 4 (tiny model: 8 x processes)
: "${MICRO_BATCH_SIZE:=}"             # samples per process per forward; unset: 1 (tiny model: 8)
: "${NUM_GPUS:=1}"                    # processes per node (CPU processes without CUDA)
: "${MASTER_PORT:=}"                  # unset: a free port on one node; 29501 with several nodes
set +a
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)/scripts/launch_common.sh"
clara_launch train_single_gpu.sh 4 1 29501 "$@"  # default BATCH_SIZE, MICRO_BATCH_SIZE; port of several nodes
