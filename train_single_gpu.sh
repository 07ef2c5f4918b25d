#!/usr/bin/env bash
# Train one CLaRa stage on one GPU, or on the CPU of a machine without CUDA (built-in tiny model).
#
#   ./train_single_gpu.sh                                    # stage1 on example/pretrain_data.jsonl
#   STAGE=stage1_2 PRETRAIN_CHECKPOINT=./checkpoints/clara_stage1 ./train_single_gpu.sh
#   STAGE=stage2 PRETRAIN_CHECKPOINT=./checkpoints/clara_stage1_2 ./train_single_gpu.sh
#   ./train_single_gpu.sh --max_steps 20                     # extra arguments go to python -m clara.train
#   DRY_RUN=true ./train_single_gpu.sh                       # print the command, run nothing
#
# Every setting is an environment variable with the default below; empty means unset. Settings are
# checked before anything starts (exit 2 and one line naming the bad one). Output is also appended to
# $SAVE_PATH/train.log. Re-running the same command resumes from the newest checkpoint (RESUME=auto).
set -euo pipefail
set -a # every setting below reaches python -m clara.launch, which resolves and checks them

# What to train
: "${STAGE:=stage1}"                  # stage1 | stage1_2 | stage2
: "${MODEL_PATH:=}"                   # hub id or local dir; unset: Qwen/Qwen3-14B with CUDA, built-in "tiny" without
: "${PRETRAIN_CHECKPOINT:=}"          # previous stage's SAVE_PATH (stage1_2 needs stage1's, stage2 needs stage1_2's)
: "${ALLOW_NO_CHECKPOINT:=false}"     # true: stage1_2/stage2 may start from the base model
: "${DATASET:=}"                      # JSONL, several joined by commas; unset: example/pretrain_data.jsonl (stage1),
                                      #   example/instruction_tuning_data.jsonl (stage1_2), example/end_to_end_data.jsonl (stage2)
: "${EVAL_DATASET:=}"                 # optional held-out JSONL, evaluated every EVAL_STEPS and at the end
: "${EVAL_MAX_SAMPLES:=100}"          # samples generated from per evaluation (stage1_2, stage2)
: "${SAVE_PATH:=}"                    # unset: ./checkpoints/clara_${STAGE}
: "${BAD_SAMPLES:=error}"             # error: stop on bad records; skip: train on the good ones
: "${DATA_WORKERS:=}"                  # processes preparing the data on first use; unset: the CPUs we may use (<= 16)
# Model
: "${DOC_MAX_LENGTH:=256}"            # max document tokens
: "${COMPRESS_RATE:=32}"              # document tokens per memory vector (DOC_MAX_LENGTH / COMPRESS_RATE memory tokens)
: "${GENERATION_TOP_K:=5}"            # stage2: documents selected per question
: "${MAX_LEN:=}"                      # max decoder tokens; unset: 2048 (stage2: 1024)
: "${MSE_WEIGHT:=}"                   # weight of the MSE alignment loss, 0 turns it off; unset: 0.1 (tiny model: 0)
: "${RETRIEVAL_WEIGHT:=0}"            # stage2: weight of a loss towards pos_index; 0: the official objective (generator loss only)
: "${FLASH_ATTN:=auto}"               # auto: FlashAttention-2 when installed and on CUDA, else SDPA; true; false
: "${DTYPE:=auto}"                    # auto: bf16 (fp16 on GPUs without bf16: V100, T4), fp32 on CPU; bf16 | fp16 | fp32
: "${GRADIENT_CHECKPOINTING:=}"       # unset: true with CUDA, false on CPU
# Optimisation
: "${LEARNING_RATE:=}"                # unset: 1e-4 (stage2: 5e-6); tiny model 2e-3 (stage2: 1e-3)
: "${BATCH_SIZE:=}"                   # global batch (samples per optimizer step); unset: 4 (tiny model: 8 x processes)
: "${MICRO_BATCH_SIZE:=}"             # samples per process per forward; unset: 1 (tiny model: 8)
: "${MAX_EPOCHS:=1}"
: "${MAX_STEPS:=}"                    # unset: the epochs decide
: "${MAX_SAMPLES:=}"                  # unset: all training samples
: "${SEED:=42}"
: "${ZERO_STAGE:=2}"                  # DeepSpeed ZeRO stage: 0, 1, 2, or 3 (3: the base model is partitioned too)
: "${OFFLOAD:=none}"                  # ZeRO-Offload to CPU memory: none | optimizer (ZERO_STAGE 1-3) | all (ZERO_STAGE=3)
# Output
: "${DEBUG_MODE:=true}"               # colour-coded per-token confidence print
: "${DEBUG_EVERY_STEPS:=5}"
: "${DEBUG_MAX_PRINT_TOKENS:=100}"
: "${LOGGING_STEPS:=1}"               # metrics.jsonl every N optimizer steps
: "${EVAL_STEPS:=50}"
: "${SAVE_STEPS:=100}"                # resumable checkpoint every N optimizer steps (and at the end)
: "${MAX_CKPT_NUM:=3}"                # resumable checkpoints kept
: "${RESUME:=auto}"                   # auto: continue from the newest checkpoint; false: start over; or a step_N dir
: "${RESUME_CHANGED_INPUTS:=false}"   # true: resume even though DATASET or the base model changed (exit 2 otherwise)
: "${USE_TENSORBOARD:=false}"
: "${USE_WANDB:=false}"
: "${WANDB_PROJECT:=clara}"
# Processes
: "${NUM_GPUS:=1}"                    # processes per node (CPU processes without CUDA)
: "${NUM_NODES:=1}"
: "${NODE_RANK:=0}"
: "${MASTER_ADDR:=127.0.0.1}"
: "${MASTER_PORT:=}"                  # unset: a free port on one node; 29501 with several nodes
: "${DRY_RUN:=false}"                 # true: print the command and exit

set +a
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)/scripts/launch_common.sh"
clara_launch train_single_gpu.sh 4 1 29501 "$@"  # default BATCH_SIZE, MICRO_BATCH_SIZE; port of several nodes
