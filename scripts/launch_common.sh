# shellcheck shell=bash
# Shared by train_single_gpu.sh and train_8gpu.sh, which set their defaults and then call
#
#     clara_launch SCRIPT_NAME "$@"
#
# Steps: validate every setting (cheap: no Python is started, each failure is exit 2 and one line
# naming the variable, its value and what is expected), detect CUDA once, resolve the defaults that
# depend on the stage and the device, print the resolved configuration, and start ONE
# `torchrun ... -m clara.train` with every setting as a flag. Arguments after the script name are
# appended to the trainer's flags unchanged (a later flag wins, so they override the variables).
# Everything printed from then on is appended to $SAVE_PATH/train.log as well.

CLARA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)

# Signal bookkeeping for the launch (see _clara_on_signal).
_clara_agent=""
_clara_signal=""
_clara_interrupted=0

# ---------------------------------------------------------------------------------------------------
# Validation helpers. Each exits 2 with one line on stderr.
clara_fail() {
    printf 'error: %s\n' "$*" >&2
    exit 2
}

# _clara_int NAME MIN [MAX]: a whole number in [MIN, MAX]; leading zeros are dropped (no octal).
_clara_int() {
    local name=$1 min=$2 max=${3:-} value=${!1} expected
    if [[ -n $max ]]; then
        expected="an integer from $min to $max"
    elif ((min == 1)); then
        expected="a positive integer"
    else
        expected="an integer >= $min"
    fi
    [[ $value =~ ^[0-9]{1,15}$ ]] || clara_fail "$name=$value: expected $expected"
    value=$((10#$value))
    ((value >= min)) || clara_fail "$name=${!name}: expected $expected"
    if [[ -n $max ]] && ((value > max)); then
        clara_fail "$name=${!name}: expected $expected"
    fi
    printf -v "$name" '%d' "$value"
}

# _clara_opt_int NAME MIN: like _clara_int, but empty means unset.
_clara_opt_int() {
    if [[ -n ${!1} ]]; then
        _clara_int "$1" "$2"
    fi
}

# _clara_float NAME positive|nonnegative: a decimal number such as 2e-5, 0.1 or 3.
_clara_float() {
    local name=$1 kind=$2 value=${!1}
    local expected="a number > 0 (e.g. 1e-4)"
    [[ $kind == positive ]] || expected="a number >= 0 (e.g. 0.1)"
    [[ $value =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] || clara_fail "$name=$value: expected $expected"
    if [[ $kind == positive && ! ${BASH_REMATCH[1]} =~ [1-9] ]]; then
        clara_fail "$name=$value: expected $expected"
    fi
}

# _clara_bool NAME [optional]: true or false (any letter case; normalised to lower case).
_clara_bool() {
    local name=$1 value=${!1}
    if [[ -z $value && ${2:-} == optional ]]; then
        return 0
    fi
    case ${value,,} in
        true | false) printf -v "$name" '%s' "${value,,}" ;;
        *) clara_fail "$name=$value: expected true or false" ;;
    esac
}

# _clara_choice NAME CHOICE...
_clara_choice() {
    local name=$1 choice
    shift
    for choice in "$@"; do
        if [[ ${!name} == "$choice" ]]; then
            return 0
        fi
    done
    local list
    printf -v list '%s, ' "$@"
    clara_fail "$name=${!name}: expected one of ${list%, }"
}

# _clara_files NAME: one or more readable files joined by commas.
_clara_files() {
    local name=$1 value=${!1} file
    local -a files
    if [[ -z $value || $value == ,* || $value == *, || $value == *,,* ]]; then
        clara_fail "$name=$value: expected one or more JSONL files joined by commas (an empty entry was given)"
    fi
    IFS=, read -r -a files <<<"$value"
    for file in "${files[@]}"; do
        if [[ -d $file ]]; then
            clara_fail "$name=$value: '$file' is a directory; expected JSONL files joined by commas"
        elif [[ ! -e $file ]]; then
            clara_fail "$name=$value: '$file' does not exist; expected readable JSONL files joined by commas"
        elif [[ ! -f $file || ! -r $file ]]; then
            clara_fail "$name=$value: '$file' is not a readable file; expected readable JSONL files joined by commas"
        fi
    done
}

_clara_validate() {
    _clara_choice STAGE stage1 stage1_2 stage2

    # Defaults that depend on the stage. The example data is found from any working directory.
    if [[ -z $DATASET ]]; then
        case $STAGE in
            stage1) DATASET=example/pretrain_data.jsonl ;;
            stage1_2) DATASET=example/instruction_tuning_data.jsonl ;;
            stage2) DATASET=example/end_to_end_data.jsonl ;;
        esac
        if [[ ! -e $DATASET ]]; then
            DATASET=$CLARA_ROOT/$DATASET
        fi
    fi
    if [[ -z $SAVE_PATH ]]; then
        SAVE_PATH=./checkpoints/clara_$STAGE
    fi

    # Numbers: integers where the trainer wants whole numbers, decimals where it takes floats.
    local name
    for name in DOC_MAX_LENGTH COMPRESS_RATE GENERATION_TOP_K MAX_EPOCHS \
        DEBUG_EVERY_STEPS DEBUG_MAX_PRINT_TOKENS LOGGING_STEPS EVAL_STEPS SAVE_STEPS EVAL_MAX_SAMPLES \
        MAX_CKPT_NUM NUM_GPUS NUM_NODES; do
        _clara_int "$name" 1
    done
    for name in BATCH_SIZE MICRO_BATCH_SIZE MAX_LEN MAX_STEPS MAX_SAMPLES; do
        _clara_opt_int "$name" 1
    done
    _clara_int NODE_RANK 0
    _clara_int SEED 0
    _clara_int MASTER_PORT 1 65535
    _clara_int ZERO_STAGE 0 2
    if [[ -n $LEARNING_RATE ]]; then
        _clara_float LEARNING_RATE positive
    fi
    if [[ -n $MSE_WEIGHT ]]; then
        _clara_float MSE_WEIGHT nonnegative
    fi

    for name in DEBUG_MODE ALLOW_NO_CHECKPOINT USE_TENSORBOARD USE_WANDB DRY_RUN; do
        _clara_bool "$name"
    done
    _clara_bool GRADIENT_CHECKPOINTING optional
    FLASH_ATTN=${FLASH_ATTN,,}
    _clara_choice FLASH_ATTN auto true false
    _clara_choice BAD_SAMPLES error skip
    if [[ $RESUME != auto && $RESUME != false && ! -d $RESUME ]]; then
        clara_fail "RESUME=$RESUME: expected auto, false, or an existing checkpoint directory (\$SAVE_PATH/checkpoints/step_N)"
    fi
    if [[ -z $MASTER_ADDR ]]; then
        clara_fail "MASTER_ADDR is empty: expected the address of the node with NODE_RANK=0 (127.0.0.1 on one node)"
    fi
    if [[ -z $WANDB_PROJECT ]]; then
        clara_fail "WANDB_PROJECT is empty: expected a Weights & Biases project name"
    fi

    # Relations between settings. Batch sizes left unset are checked once the device decided them.
    if [[ -n $BATCH_SIZE && -n $MICRO_BATCH_SIZE ]]; then
        _clara_check_batch
    fi
    if ((DOC_MAX_LENGTH % COMPRESS_RATE)); then
        clara_fail "DOC_MAX_LENGTH=$DOC_MAX_LENGTH: expected a multiple of COMPRESS_RATE=$COMPRESS_RATE" \
            "(memory tokens per document = DOC_MAX_LENGTH / COMPRESS_RATE)"
    fi
    if ((NODE_RANK >= NUM_NODES)); then
        clara_fail "NODE_RANK=$NODE_RANK: expected a node rank below NUM_NODES=$NUM_NODES (0 to $((NUM_NODES - 1)))"
    fi

    # Files.
    _clara_files DATASET
    if [[ -n $EVAL_DATASET ]]; then
        _clara_files EVAL_DATASET
    fi
    if [[ -n $PRETRAIN_CHECKPOINT ]]; then
        # Not a directory but read as a Hugging Face Hub id owner/name[/subfolder], by the rule of
        # clara.config.hub_id_parts (relative, and its first part is no local directory): Python resolves it.
        local hub_id='^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(/.*)?$'
        if [[ ! -d $PRETRAIN_CHECKPOINT && $PRETRAIN_CHECKPOINT =~ $hub_id && ! -d ${PRETRAIN_CHECKPOINT%%/*} ]]; then
            :
        elif [[ ! -d $PRETRAIN_CHECKPOINT ]]; then
            clara_fail "PRETRAIN_CHECKPOINT=$PRETRAIN_CHECKPOINT: no such directory; expected the SAVE_PATH" \
                "of a finished earlier stage, or a Hub id such as apple/CLaRa-7B-Instruct/compression-16"
        elif [[ ! -f $PRETRAIN_CHECKPOINT/config.json ]]; then
            clara_fail "PRETRAIN_CHECKPOINT=$PRETRAIN_CHECKPOINT: not a checkpoint (no config.json inside);" \
                "expected the SAVE_PATH of a finished earlier stage"
        fi
    elif [[ $STAGE != stage1 && $ALLOW_NO_CHECKPOINT != true ]]; then
        local previous=stage1
        [[ $STAGE == stage1_2 ]] || previous=stage1_2
        clara_fail "PRETRAIN_CHECKPOINT is unset: STAGE=$STAGE continues from a $previous checkpoint;" \
            "expected PRETRAIN_CHECKPOINT=<the $previous SAVE_PATH>, or ALLOW_NO_CHECKPOINT=true to start from the base model"
    fi

    # Static rendezvous: the node with NODE_RANK=0 hosts the store on MASTER_PORT, so it must be free here.
    if ((NODE_RANK == 0)) && (exec 3<>"/dev/tcp/127.0.0.1/$MASTER_PORT") 2>/dev/null; then
        clara_fail "MASTER_PORT=$MASTER_PORT: already in use on this machine (another run?); expected a free port," \
            "e.g. MASTER_PORT=$((MASTER_PORT + 100))"
    fi
}

# ---------------------------------------------------------------------------------------------------
# Device detection and the defaults that depend on it.
_clara_python() {
    if [[ -n ${PYTHON:-} ]]; then
        printf '%s' "$PYTHON"
    elif command -v python >/dev/null 2>&1; then
        printf python
    else
        printf python3
    fi
}

_clara_check_batch() {
    local per_step=$((MICRO_BATCH_SIZE * NUM_GPUS * NUM_NODES))
    if ((BATCH_SIZE % per_step)); then
        clara_fail "BATCH_SIZE=$BATCH_SIZE: expected a multiple of MICRO_BATCH_SIZE x NUM_GPUS x NUM_NODES" \
            "= $MICRO_BATCH_SIZE x $NUM_GPUS x $NUM_NODES = $per_step"
    fi
}

_clara_resolve_device() {
    local out count
    if ! out=$("$CLARA_PY" -c 'import torch; print(torch.cuda.device_count())' 2>&1); then
        clara_fail "cannot import torch with '$CLARA_PY' ($(tail -n 1 <<<"$out")); expected the packages of requirements.txt"
    fi
    count=$(tail -n 1 <<<"$out")
    [[ $count =~ ^[0-9]+$ ]] || clara_fail "cannot count CUDA devices with '$CLARA_PY': got '$count'"
    CLARA_CUDA_DEVICES=$count
    if ((count > 0)); then
        if ((NUM_GPUS > count)); then
            clara_fail "NUM_GPUS=$NUM_GPUS: expected at most $count (the CUDA devices visible on this node)"
        fi
        CLARA_DEVICE="CUDA: $count device(s) visible, $NUM_GPUS process(es) per node (bf16, NCCL)"
        CLARA_MODEL_NOTE=""
        if [[ -z $MODEL_PATH ]]; then
            MODEL_PATH=Qwen/Qwen3-14B
            CLARA_MODEL_NOTE=" (default with CUDA)"
        fi
        if [[ -z $GRADIENT_CHECKPOINTING ]]; then
            GRADIENT_CHECKPOINTING=true
        fi
    else
        CLARA_DEVICE="no CUDA device found: $NUM_GPUS CPU process(es) per node (float32, gloo, SDPA)"
        CLARA_MODEL_NOTE=""
        if [[ -z $MODEL_PATH ]]; then
            MODEL_PATH=tiny
            CLARA_MODEL_NOTE=" (the built-in tiny model: default without CUDA)"
        fi
        if [[ -z $GRADIENT_CHECKPOINTING ]]; then
            GRADIENT_CHECKPOINTING=false
        fi
    fi

    # Batch sizes: the script's defaults, except that the tiny model trains in one micro-batch of 8
    # per process and step, which keeps a CPU epoch of the example data within minutes.
    if [[ $MODEL_PATH == tiny ]]; then
        : "${MICRO_BATCH_SIZE:=8}"
        : "${BATCH_SIZE:=$((MICRO_BATCH_SIZE * NUM_GPUS * NUM_NODES))}"
    else
        : "${MICRO_BATCH_SIZE:=$CLARA_DEFAULT_MICRO_BATCH_SIZE}"
        : "${BATCH_SIZE:=$CLARA_DEFAULT_BATCH_SIZE}"
    fi
    _clara_check_batch

    # One intra-op thread pool per process: share the cores among this node's processes.
    local cores
    cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
    if [[ -n ${OMP_NUM_THREADS:-} ]]; then
        CLARA_THREADS_NOTE="$OMP_NUM_THREADS (from the environment)"
    elif [[ $MODEL_PATH == tiny ]]; then
        # The tiny model's matrices are too small for a second thread to pay for itself.
        OMP_NUM_THREADS=1
        CLARA_THREADS_NOTE="1 (the tiny model is faster on one thread)"
        CLARA_ENV+=(OMP_NUM_THREADS=1)
    else
        OMP_NUM_THREADS=$((cores / NUM_GPUS))
        ((OMP_NUM_THREADS >= 1)) || OMP_NUM_THREADS=1
        CLARA_THREADS_NOTE="$OMP_NUM_THREADS ($cores cores / $NUM_GPUS process(es) on this node)"
        CLARA_ENV+=(OMP_NUM_THREADS="$OMP_NUM_THREADS")
    fi
    export OMP_NUM_THREADS
}

# The trainer's own defaults (clara/config.py resolve()), shown in the summary; the flag is passed
# only when the variable is set, so that the trainer stays the one place that decides them.
_clara_auto_learning_rate() {
    if [[ $MODEL_PATH == tiny ]]; then
        [[ $STAGE == stage2 ]] && echo 1e-3 || echo 2e-3
    else
        [[ $STAGE == stage2 ]] && echo 5e-6 || echo 1e-4
    fi
}

_clara_auto_mse_weight() {
    [[ $MODEL_PATH == tiny ]] && echo 0 || echo 0.1
}

_clara_auto_max_len() {
    [[ $STAGE == stage2 ]] && echo 1024 || echo 2048
}

# ---------------------------------------------------------------------------------------------------
_clara_build_command() {
    local -a runner
    if command -v torchrun >/dev/null 2>&1; then
        runner=(torchrun)
    else
        runner=("$CLARA_PY" -m torch.distributed.run)
    fi
    CLARA_CMD=("${runner[@]}"
        --nproc_per_node "$NUM_GPUS" --nnodes "$NUM_NODES" --node_rank "$NODE_RANK"
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
        -m clara.train
        --stage "$STAGE" --model_path "$MODEL_PATH" --dataset "$DATASET" --save_path "$SAVE_PATH"
        --allow_no_checkpoint "$ALLOW_NO_CHECKPOINT"
        --doc_max_length "$DOC_MAX_LENGTH" --compress_rate "$COMPRESS_RATE" --generation_top_k "$GENERATION_TOP_K"
        --batch_size "$BATCH_SIZE" --micro_batch_size "$MICRO_BATCH_SIZE" --max_epochs "$MAX_EPOCHS"
        --debug_mode "$DEBUG_MODE" --debug_every_steps "$DEBUG_EVERY_STEPS"
        --debug_max_print_tokens "$DEBUG_MAX_PRINT_TOKENS"
        --logging_steps "$LOGGING_STEPS" --eval_steps "$EVAL_STEPS" --save_steps "$SAVE_STEPS"
        --eval_max_samples "$EVAL_MAX_SAMPLES"
        --seed "$SEED" --zero_stage "$ZERO_STAGE" --gradient_checkpointing "$GRADIENT_CHECKPOINTING"
        --flash_attn "$FLASH_ATTN" --max_ckpt_num "$MAX_CKPT_NUM"
        --resume "$RESUME" --bad_samples "$BAD_SAMPLES"
        --use_tensorboard "$USE_TENSORBOARD" --use_wandb "$USE_WANDB" --wandb_project "$WANDB_PROJECT")
    local pair flag value
    for pair in pretrain_checkpoint:PRETRAIN_CHECKPOINT eval_dataset:EVAL_DATASET learning_rate:LEARNING_RATE mse_weight:MSE_WEIGHT \
        max_len:MAX_LEN max_steps:MAX_STEPS max_samples:MAX_SAMPLES; do
        flag=${pair%%:*}
        value=${pair#*:}
        value=${!value}
        if [[ -n $value ]]; then
            CLARA_CMD+=("--$flag" "$value")
        fi
    done
    CLARA_CMD+=("$@")
}

# The command as one copy-pasteable line (environment settings first, every word shell-quoted).
_clara_command_line() {
    local line="" word
    for word in "${CLARA_ENV[@]}" "${CLARA_CMD[@]}"; do
        line+=$(printf '%q' "$word")" "
    done
    printf '%s\n' "${line% }"
}

# _clara_row KEY VALUE...: one aligned line of the summary.
_clara_row() {
    local key=$1
    shift
    printf '  %-30s %s\n' "$key" "$*"
}

_clara_summary() {
    local script=$1
    shift
    local lr="auto: $(_clara_auto_learning_rate) (the trainer's default for this model and stage)"
    local max_len="auto: $(_clara_auto_max_len) (the trainer's default for this stage)"
    local world=$((NUM_GPUS * NUM_NODES))
    [[ -z $LEARNING_RATE ]] || lr=$LEARNING_RATE
    local mse="auto: $(_clara_auto_mse_weight) (the trainer's default for this model)"
    [[ -z $MAX_LEN ]] || max_len=$MAX_LEN
    [[ -z $MSE_WEIGHT ]] || mse=$MSE_WEIGHT
    printf '==================== CLaRa %s: %s ====================\n' "$STAGE" "$script"
    _clara_row device "$CLARA_DEVICE"
    _clara_row MODEL_PATH "$MODEL_PATH$CLARA_MODEL_NOTE"
    _clara_row PRETRAIN_CHECKPOINT "${PRETRAIN_CHECKPOINT:-(none: adapters start fresh)}"
    _clara_row DATASET "$DATASET"
    _clara_row EVAL_DATASET "${EVAL_DATASET:-(none)}"
    _clara_row SAVE_PATH "$SAVE_PATH"
    _clara_row "DOC_MAX_LENGTH / COMPRESS_RATE" \
        "$DOC_MAX_LENGTH / $COMPRESS_RATE = $((DOC_MAX_LENGTH / COMPRESS_RATE)) memory tokens per document"
    if [[ $STAGE == stage2 ]]; then
        _clara_row GENERATION_TOP_K "$GENERATION_TOP_K"
    fi
    _clara_row LEARNING_RATE "$lr"
    _clara_row "BATCH_SIZE" "$BATCH_SIZE = MICRO_BATCH_SIZE $MICRO_BATCH_SIZE x $world process(es)" \
        "x gradient accumulation $((BATCH_SIZE / (MICRO_BATCH_SIZE * world)))"
    _clara_row MAX_EPOCHS "$MAX_EPOCHS"
    _clara_row MAX_STEPS "${MAX_STEPS:-(unset: the epochs decide)}"
    _clara_row MAX_SAMPLES "${MAX_SAMPLES:-(unset: all)}"
    _clara_row MAX_LEN "$max_len"
    _clara_row DEBUG_MODE "$DEBUG_MODE (every $DEBUG_EVERY_STEPS steps, up to $DEBUG_MAX_PRINT_TOKENS tokens)"
    _clara_row "LOGGING/EVAL/SAVE_STEPS" "$LOGGING_STEPS / $EVAL_STEPS / $SAVE_STEPS"
    _clara_row "processes" "NUM_NODES $NUM_NODES x NUM_GPUS $NUM_GPUS = world size $world;" \
        "NODE_RANK $NODE_RANK; rendezvous $MASTER_ADDR:$MASTER_PORT"
    _clara_row ZERO_STAGE "$ZERO_STAGE"
    _clara_row GRADIENT_CHECKPOINTING "$GRADIENT_CHECKPOINTING"
    _clara_row FLASH_ATTN "$FLASH_ATTN"
    _clara_row MSE_WEIGHT "$mse"
    _clara_row SEED "$SEED"
    _clara_row "RESUME / MAX_CKPT_NUM" "$RESUME / $MAX_CKPT_NUM"
    _clara_row BAD_SAMPLES "$BAD_SAMPLES"
    _clara_row "USE_TENSORBOARD/WANDB" "$USE_TENSORBOARD / $USE_WANDB (project $WANDB_PROJECT)"
    _clara_row OMP_NUM_THREADS "$CLARA_THREADS_NOTE"
    if (($#)); then
        _clara_row "extra trainer arguments" "$(printf '%q ' "$@")"
    fi
}

# ---------------------------------------------------------------------------------------------------
# Signals. torchrun starts every worker in a session of its own, so a signal to this process group
# (Ctrl-C, `kill -TERM -PGID`) reaches this script and the torchrun agent, but not the trainers; the
# agent passes it on. A signal to this script alone (a container's PID 1, `kill PID`) has to be
# passed on by us. We signal the workers' groups, as the agent itself does: the trainer handles a
# repeated signal like one (it finishes the step, saves, exits), whereas a second signal to the agent
# aborts its wait for the workers.
_clara_children() {
    local parent=$1 stat rest
    if command -v pgrep >/dev/null 2>&1; then
        pgrep -P "$parent" || true
        return 0
    fi
    for stat in /proc/[0-9]*/stat; do
        rest=$(<"$stat") 2>/dev/null || continue
        rest=${rest##*) }
        read -r _ ppid _ <<<"$rest"
        if [[ $ppid == "$parent" ]]; then
            stat=${stat#/proc/}
            echo "${stat%/stat}"
        fi
    done
}

_clara_on_signal() {
    local sig=$1 pid sent=0
    _clara_signal=$sig
    _clara_interrupted=1
    if [[ -z $_clara_agent ]]; then
        return 0
    fi
    for pid in $(_clara_children "$_clara_agent"); do
        if kill -s "$sig" -- "-$pid" 2>/dev/null || kill -s "$sig" "$pid" 2>/dev/null; then
            sent=1
        fi
    done
    if ((sent == 0)); then
        # No workers yet: stop the agent itself (SIGTERM: a background job ignores SIGINT).
        kill -s TERM "$_clara_agent" 2>/dev/null || true
    fi
    printf '\n[launcher] received SIG%s: the trainer finishes its step, saves a resumable checkpoint and stops.\n' "$sig"
}

# ---------------------------------------------------------------------------------------------------
clara_usage() {
    local script=$1
    # The script's header comment and its block of defaults.
    sed -n '2,/^source /p' "$script" | sed -e '/^source /d' -e '/^set -euo pipefail/d'
    echo
    echo
    echo "Trainer flags (appended unchanged after the script name): $(_clara_python) -m clara.train --help"
}

clara_launch() {
    local script=$1
    shift
    if [[ ${1:-} == -h || ${1:-} == --help ]]; then
        clara_usage "$CLARA_ROOT/$script"
        return 0
    fi
    if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
        clara_fail "bash $BASH_VERSION: expected bash 4.4 or newer"
    fi
    CLARA_ENV=()
    CLARA_PY=$(_clara_python)

    _clara_validate
    _clara_resolve_device
    if [[ $(pwd -P) != "$CLARA_ROOT" ]]; then
        # Let `python -m clara.train` find the package from any working directory.
        PYTHONPATH=$CLARA_ROOT${PYTHONPATH:+:$PYTHONPATH}
        export PYTHONPATH
        CLARA_ENV+=(PYTHONPATH="$PYTHONPATH")
    fi
    # torchrun kills workers that have not exited this long after it passed a signal on; saving a
    # large model's resumable checkpoint can take longer than its default of 30 s.
    if [[ -z ${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-} ]]; then
        export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300
        CLARA_ENV+=(TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300)
    fi
    _clara_build_command "$@"

    if [[ $DRY_RUN == true ]]; then
        _clara_summary "$script" "$@"
        echo "DRY_RUN=true: the command below is not run."
        _clara_command_line
        return 0
    fi

    # The log: the same output, appended. With several nodes sharing SAVE_PATH, nodes other than 0 keep
    # their own file. A --save_path among the extra arguments moves the log along with the model.
    local log_dir=$SAVE_PATH i next
    for ((i = 1; i <= $#; i++)); do
        case ${!i} in
            --save_path)
                next=$((i + 1))
                log_dir=${!next:-$log_dir}
                ;;
            --save_path=*) log_dir=${!i#--save_path=} ;;
        esac
    done
    local log=$log_dir/train.log
    if ((NODE_RANK > 0)); then
        log=$log_dir/train_node$NODE_RANK.log
    fi
    mkdir -p -- "$log_dir" 2>/dev/null || clara_fail "SAVE_PATH=$log_dir: cannot create the directory; expected a writable path"
    : >>"$log" 2>/dev/null || clara_fail "SAVE_PATH=$log_dir: cannot write $log; expected a writable path"

    # From here on, everything this script and the trainer print goes through tee into the log. tee
    # ignores INT and TERM so that the trainer's last words after a Ctrl-C still reach the terminal and the log.
    local out_fd err_fd tee_fd tee_pid log_offset
    log_offset=$(wc -c <"$log")
    exec {out_fd}>&1 {err_fd}>&2
    exec {tee_fd}> >(trap '' INT TERM; exec tee -a "$log")
    tee_pid=$!
    exec 1>&"$tee_fd" 2>&1

    printf '\n[launcher] %s  %s on %s (log: %s)\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$script" \
        "$(hostname 2>/dev/null || echo localhost)" "$log"
    _clara_summary "$script" "$@"
    echo "Command: $(_clara_command_line)"

    trap '_clara_on_signal TERM' TERM
    trap '_clara_on_signal INT' INT
    "${CLARA_CMD[@]}" {out_fd}>&- {err_fd}>&- {tee_fd}>&- &
    _clara_agent=$!
    if ((_clara_interrupted)); then
        _clara_on_signal "$_clara_signal" # it came before the agent existed
    fi
    local status=0
    wait "$_clara_agent" || status=$?
    while ((_clara_interrupted)); do
        # A trapped signal ends `wait` early: keep waiting for the trainer to save and stop.
        _clara_interrupted=0
        status=0
        wait "$_clara_agent" || status=$?
    done
    trap - TERM INT

    # Close our ends of the pipe and let tee write the last lines before the verdict is read from the log.
    exec 1>&"$out_fd" 2>&"$err_fd" {tee_fd}>&-
    for ((i = 0; i < 100; i++)); do
        kill -0 "$tee_pid" 2>/dev/null || break
        sleep 0.05
    done

    local verdict
    if ((status == 0)); then
        verdict="[launcher] done: the $STAGE model is in $log_dir (log: $log)"
        if ((NODE_RANK > 0)); then
            verdict="[launcher] node $NODE_RANK done (log: $log)"
        fi
    elif [[ -n $_clara_signal ]]; then
        status=$((128 + $(kill -l "$_clara_signal")))
        verdict="[launcher] stopped by SIG$_clara_signal (exit $status). Run the same command again to resume from the newest checkpoint in $log_dir/checkpoints (RESUME=$RESUME)."
    else
        # torchrun exits 1 whatever its workers returned; keep the trainer's own status (2: bad settings
        # or data), read from the first failure torchrun reports ("Root Cause ... exitcode : N").
        local code
        code=$(tail -c "+$((log_offset + 1))" "$log" |
            sed -n '/Root Cause/,$ s/^ *exitcode *: *\(-\{0,1\}[0-9][0-9]*\).*/\1/p' || true)
        code=${code%%$'\n'*}
        if [[ $code =~ ^[0-9]+$ ]] && ((code > 0 && code < 256)); then
            status=$code
        elif [[ $code =~ ^-[0-9]+$ ]]; then
            status=$((128 - code))
        fi
        verdict="[launcher] error: training failed (exit $status); the failing rank and its error are named above (torchrun's \"Root Cause\"). Log: $log"
    fi
    printf '%s\n' "$verdict"
    printf '%s\n' "$verdict" >>"$log"
    return "$status"
}
