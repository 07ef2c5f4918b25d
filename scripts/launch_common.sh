# shellcheck shell=bash
# Shared by train_single_gpu.sh and train_8gpu.sh, which set their own defaults (the trainer's are
# TrainConfig's, filled in by Python) and then call
#
#     clara_launch SCRIPT_NAME DEFAULT_BATCH_SIZE DEFAULT_MICRO_BATCH_SIZE MULTI_NODE_PORT "$@"
#
# Python resolves and checks every setting in one call (`python -m clara.training.launch`: exit 2 and one line
# naming a bad variable) and hands back the torchrun command, its environment, the log file and the
# summary. What stays here is what bash must do: print and log (everything from then on is appended to
# $SAVE_PATH/train.log), start torchrun, pass signals on, and keep the trainer's exit status.

CLARA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)

# Signal bookkeeping for the launch (see _clara_on_signal).
_clara_agent=""
_clara_signal=""
_clara_interrupted=0

clara_fail() {
    printf 'error: %s\n' "$*" >&2
    exit 2
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
    shift
    # The script's header comment, then every setting with its default (the script's, else the trainer's).
    sed -n '2,/^set -euo pipefail/p' "$CLARA_ROOT/$script" | sed '$d'
    echo
    "${PYTHON:-python}" -m clara.training.launch --script "$script" "$@" --usage
    echo
    echo "Trainer flags (appended unchanged after the script name): python -m clara.train --help"
}

clara_launch() {
    local script=$1 batch_size=$2 micro_batch_size=$3 multi_node_port=$4
    shift 4
    if [[ ${1:-} == -h || ${1:-} == --help ]]; then
        clara_usage "$script" --batch_size "$batch_size" --micro_batch_size "$micro_batch_size" \
            --master_port "$multi_node_port"
        return $?
    fi
    if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
        clara_fail "bash $BASH_VERSION: expected bash 4.4 or newer"
    fi
    local plan
    plan=$("${PYTHON:-python}" -m clara.training.launch --script "$script" --batch_size "$batch_size" \
        --micro_batch_size "$micro_batch_size" --master_port "$multi_node_port" -- "$@") || return $?
    local CLARA_ENV CLARA_CMD CLARA_COMMAND_LINE CLARA_LOG CLARA_SAVE_PATH CLARA_STAGE CLARA_NODE_RANK \
        CLARA_DRY_RUN CLARA_SUMMARY
    eval "$plan"

    if [[ $CLARA_DRY_RUN == true ]]; then
        printf '%s\n' "$CLARA_SUMMARY"
        echo "DRY_RUN=true: the command below is not run."
        printf '%s\n' "$CLARA_COMMAND_LINE"
        return 0
    fi
    # One run per SAVE_PATH: the lock is taken on a descriptor this script keeps open (torchrun inherits
    # it), so it ends with the run's processes, kill -9 included. Node 0 holds it for every node.
    local lock_fd CLARA_LOCK_INFO="" CLARA_LOCK_LINE=""
    if ((CLARA_NODE_RANK == 0)); then
        exec {lock_fd}<>"$CLARA_SAVE_PATH/.lock"
        plan=$("${PYTHON:-python}" -m clara.locks --folder "$CLARA_SAVE_PATH" --fd "$lock_fd" --pid $$ \
            --what "$script") || return $?
        eval "$plan"
        export CLARA_LOCK_INFO
    fi
    local pair
    for pair in "${CLARA_ENV[@]}"; do
        export "${pair?}"
    done

    # From here on, everything this script and the trainer print goes through tee into the log. tee
    # ignores INT and TERM so that the trainer's last words after a Ctrl-C still reach the terminal and the log.
    local log=$CLARA_LOG out_fd err_fd tee_fd tee_pid i
    exec {out_fd}>&1 {err_fd}>&2
    exec {tee_fd}> >(trap '' INT TERM; exec tee -a "$log")
    tee_pid=$!
    exec 1>&"$tee_fd" 2>&1

    printf '\n[launcher] %s  %s on %s (log: %s)\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$script" \
        "$(hostname 2>/dev/null || echo localhost)" "$log"
    printf '%s\n' "$CLARA_SUMMARY"
    [[ -z $CLARA_LOCK_LINE ]] || printf '%s\n' "$CLARA_LOCK_LINE"
    echo "Command: $CLARA_COMMAND_LINE"

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
        verdict="[launcher] done: the $CLARA_STAGE model is in $CLARA_SAVE_PATH (log: $log)"
        if ((CLARA_NODE_RANK > 0)); then
            verdict="[launcher] node $CLARA_NODE_RANK done (log: $log)"
        fi
    elif [[ -n $_clara_signal ]]; then
        status=$((128 + $(kill -l "$_clara_signal")))
        verdict="[launcher] stopped by SIG$_clara_signal (exit $status). Run the same command again to resume from the newest checkpoint in $CLARA_SAVE_PATH/checkpoints."
    else
        # clara.training.run_workers exits with the failing worker's own status (2: bad data or settings, named above).
        verdict="[launcher] error: training failed (exit $status); the error is named above. Log: $log"
    fi
    printf '%s\n' "$verdict"
    printf '%s\n' "$verdict" >>"$log"
    return "$status"
}
