#!/usr/bin/env bash
# Train one CLaRa stage on one node of 8 GPUs (NUM_GPUS processes), or on several nodes; without CUDA
# the processes run on the CPU with the built-in tiny model (how multi-process runs are tested).
#
#   ./train_8gpu.sh                                          # stage1 on example/pretrain_data.jsonl, 8 processes
#   STAGE=stage1_2 PRETRAIN_CHECKPOINT=./checkpoints/clara_stage1 ./train_8gpu.sh
#   NUM_GPUS=4 BATCH_SIZE=64 ./train_8gpu.sh                 # BATCH_SIZE: a multiple of MICRO_BATCH_SIZE x NUM_GPUS x NUM_NODES
#   ./train_8gpu.sh --max_steps 20                           # extra arguments go to python -m clara.train
#   # Two nodes: the same command on each, with the same MASTER_ADDR/MASTER_PORT and its own NODE_RANK
#   NUM_NODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./train_8gpu.sh     # on 10.0.0.1
#   NUM_NODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 ./train_8gpu.sh     # on the other node
#   DRY_RUN=true ./train_8gpu.sh                             # print the command, run nothing
#
# Every setting is an environment variable: the trainer's flags in upper case and the process settings,
# empty meaning unset; `--help` lists them all with their defaults (the trainer's, and this script's
# below). Settings are checked before anything starts (exit 2 and one line naming the bad one). Output
# is also appended to $SAVE_PATH/train.log. Re-running the same command resumes from the newest
# checkpoint (RESUME=auto).
set -euo pipefail
set -a # this script's defaults reach python -m clara.launch, which resolves and checks every setting

# This script's defaults; every other setting has the trainer's (python -m clara.train --help)
: "${BATCH_SIZE:=}"                   # global batch (samples per optimizer step); unset: 128 (tiny model: 8 x processes)
: "${MICRO_BATCH_SIZE:=}"             # samples per process per forward; unset: 2 (tiny model: 8)
: "${DEBUG_EVERY_STEPS:=10}"          # debug print every N optimizer steps
: "${EVAL_STEPS:=100}"                # evaluate every N optimizer steps (with EVAL_DATASET)
: "${SAVE_STEPS:=500}"                # resumable checkpoint every N optimizer steps (and at the end)
# Processes (several nodes: run this script on each, with the same MASTER_ADDR, MASTER_PORT and
# NUM_NODES and each node's own NODE_RANK; the node with NODE_RANK=0 must be the one at MASTER_ADDR.
# SAVE_PATH must be on a file system all nodes share: a resumable checkpoint holds every rank's
# optimizer shard, and the nodes other than 0 log to $SAVE_PATH/train_node<NODE_RANK>.log)
: "${NUM_GPUS:=8}"                    # processes per node (CPU processes without CUDA)
: "${MASTER_PORT:=}"                  # unset: a free port on one node; 29500 with several nodes
set +a
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)/scripts/launch_common.sh"
clara_launch train_8gpu.sh 128 2 29500 "$@"  # default BATCH_SIZE, MICRO_BATCH_SIZE; port of several nodes
