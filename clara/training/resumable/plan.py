"""Which run a SAVE_PATH continues and where it starts: the checkpoint to resume from (checked whole and safe to
load before the model loads), moving another run's checkpoints aside, and what a resume may change."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import uuid
from dataclasses import dataclass

import torch.distributed as dist

from clara.config import TrainConfig, data_settings
from clara.data.fingerprint import input_changes, train_data_key, train_inputs
from clara.data.spec import parse_source
from clara.errors import ResumeError
from clara.files import fsync_path, read_json, write_json_atomic, write_text_atomic
from clara.locks import record_run_id
from clara.model.checkpoint import resolve_base_path
from clara.parallel.console import silent
from clara.parallel.distributed import broadcast
from clara.training.resumable.files import (
    MANIFEST,
    PREVIOUS_RUNS_DIR,
    RUN_FILE,
    STATE_FILE,
    TrainState,
    check_loadable,
    checkpoint_root,
    complete_checkpoints,
    manifest_problem,
    use_safe_loading,
)


@dataclass
class ResumePlan:
    """What every rank does at the start: resume from `directory` (None: start over) as run `run_id`."""

    run_id: str
    directory: str | None = None
    state: TrainState | None = None
    settings: dict | None = None
    finished: bool = False  # the checkpoint is the run's last step and its model was exported
    inputs: dict | None = None  # this run's data and model keys (clara.data.fingerprint.train_inputs), saved with it
    data_changed: bool = False  # resumed onto other data (RESUME_CHANGED_INPUTS): its position is recomputed


def _new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


def _read_run(root: str) -> dict:
    path = os.path.join(root, RUN_FILE)
    try:
        return read_json(path)
    except (FileNotFoundError, ValueError):  # none yet, or torn: the checkpoints' own run ids decide
        return {}


def _read_state(directory: str) -> dict:
    path = os.path.join(directory, STATE_FILE)
    try:
        saved = read_json(path)
        TrainState(**saved["train_state"])
        str(saved["run_id"])
    except (ValueError, KeyError, TypeError) as error:
        raise ResumeError(f"{path}: not a trainer state written by clara ({error!r})") from None
    return saved


def _choose(root: str, current_run: str | None, log) -> tuple[str, dict] | None:
    """The newest intact checkpoint of the current run (or, with no run.json, of the newest intact one)."""
    for _, tag in reversed(complete_checkpoints(root)):
        directory = os.path.join(root, tag)
        problem = manifest_problem(directory)
        if problem is None:
            saved = _read_state(directory)
            if current_run is None or saved.get("run_id") == current_run:
                return directory, saved
            problem = f"written by run {saved.get('run_id')}, not by {current_run}, the run this SAVE_PATH continues"
        log(f"Warning: skipping checkpoint {directory}: {problem}")
    return None


def _explicit(cfg: TrainConfig) -> tuple[str, dict]:
    directory = os.path.abspath(cfg.resume.rstrip("/"))
    if not any(os.path.isfile(os.path.join(directory, name)) for name in (MANIFEST, STATE_FILE)):
        raise ResumeError(
            f"--resume={cfg.resume}: not a resumable checkpoint directory (no {MANIFEST}); "
            "expected auto, false, or $SAVE_PATH/checkpoints/step_N"
        )
    problem = manifest_problem(directory)
    if problem:
        raise ResumeError(f"--resume={cfg.resume}: damaged checkpoint: {problem}")
    return directory, _read_state(directory)


def _decide(cfg: TrainConfig, total_steps: int, inputs: dict, log) -> ResumePlan:
    root = checkpoint_root(cfg)
    run = _read_run(root)
    if cfg.resume == "false":
        return ResumePlan(run_id=_new_run_id(), inputs=inputs)
    chosen = _explicit(cfg) if cfg.resume != "auto" else _choose(root, run.get("run_id"), log)
    if chosen is None:
        return ResumePlan(run_id=_new_run_id(), inputs=inputs)
    directory, saved = chosen
    check_loadable(directory)
    state = TrainState(**saved["train_state"])
    finished = (
        cfg.resume == "auto" and state.global_step >= total_steps and run.get("finished_step") == state.global_step
    )
    changes = [] if finished else input_changes(saved.get("inputs"), inputs)
    if changes and not cfg.resume_changed_inputs:
        raise ResumeError(
            f"{directory} was saved by a run on other inputs ({'; '.join(changes)}): its data position "
            "and weights belong to those. RESUME=false starts over; RESUME_CHANGED_INPUTS=true "
            f"continues this run on the new inputs (the epoch order recomputed for the new data from "
            f"step {state.global_step} on)"
        )
    if changes:
        log(f"Warning: resuming onto changed inputs (RESUME_CHANGED_INPUTS=true): {'; '.join(changes)}")
    data_changed = bool(saved.get("inputs")) and saved["inputs"]["data"] != inputs["data"]
    return ResumePlan(
        run_id=saved["run_id"],
        directory=directory,
        state=state,
        settings=saved.get("settings", {}),
        finished=finished,
        inputs=inputs,
        data_changed=data_changed,
    )


def _move_aside(cfg: TrainConfig, old_run: str | None, keep: str | None, why: str, log) -> None:
    """Move everything of another run out of checkpoints/ (and its metrics.jsonl) into previous_runs/."""
    root = checkpoint_root(cfg)
    names = sorted(
        n
        for n in (os.listdir(root) if os.path.isdir(root) else [])
        if keep is None or os.path.join(os.path.abspath(root), n) != os.path.abspath(keep)
    )
    metrics = os.path.join(cfg.save_path, "metrics.jsonl")
    if not any(re.fullmatch(r"(tmp_)?step_\d+", name) for name in names):
        # No checkpoint to keep (say the previous run was stopped before its first save): start clean.
        if os.path.exists(metrics):
            os.remove(metrics)
        return
    target = os.path.join(cfg.save_path, PREVIOUS_RUNS_DIR, old_run or time.strftime("%Y%m%d-%H%M%S-unknown"))
    while os.path.exists(target):
        target += "+"
    os.makedirs(target)
    for name in names:
        os.replace(os.path.join(root, name), os.path.join(target, name))
    if os.path.exists(metrics):
        os.replace(metrics, os.path.join(target, "metrics.jsonl"))
    fsync_path(root)
    fsync_path(target)
    steps = [tag for _, tag in complete_checkpoints(target)]
    log(
        f"{why}: moved the previous run's resumable checkpoints ({', '.join(steps) or 'none complete'}) "
        f"aside to {target}"
    )


def plan_run(cfg: TrainConfig, total_steps: int, rank: int, world: int, log) -> ResumePlan:
    """Decide on rank 0 where the run starts, and make SAVE_PATH hold this run's checkpoints only.

    A fresh start (RESUME=false, or nothing of the current run to resume) moves the checkpoints of
    any other run aside before the first save; so does resuming a checkpoint of another run.
    Called before the model loads: a damaged or planted checkpoint is reported without that cost.
    """
    decision = None
    if rank == 0:
        try:
            data = train_data_key(
                parse_source(cfg.dataset), cfg.stage, cfg.model_path, cfg.pretrain_checkpoint, data_settings(cfg)
            )
            inputs = train_inputs(data, resolve_base_path(cfg.model_path), cfg.pretrain_checkpoint)
            decision = dataclasses.asdict(_decide(cfg, total_steps, inputs, log))
        except ResumeError as error:
            decision = {"error": str(error)}
    decision = broadcast(decision, rank, world)
    if "error" in decision:
        raise ResumeError(decision["error"])
    plan = ResumePlan(**{**decision, "state": TrainState(**decision["state"]) if decision["state"] else None})
    if rank == 0:
        record_run_id(plan.run_id)  # a launch refused while this run holds SAVE_PATH names it
    # Rank 0 first; then each other node's local rank 0, whose checkpoints/ may be its own (not shared).
    for turn in (True, False):
        if (rank == 0) == turn and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            _adopt_run(cfg, plan, log if rank == 0 else silent)
        if world > 1:
            dist.barrier()
    return plan


def _adopt_run(cfg: TrainConfig, plan: ResumePlan, log) -> None:
    root = checkpoint_root(cfg)
    run = _read_run(root)
    if run.get("run_id") == plan.run_id:
        return
    inside = (
        plan.directory
        if plan.directory and os.path.dirname(os.path.abspath(plan.directory)) == os.path.abspath(root)
        else None
    )
    if plan.directory is None or run:
        why = (
            "RESUME=false"
            if cfg.resume == "false"
            else "Starting over"
            if plan.directory is None
            else f"Resuming run {plan.run_id}"
        )
        _move_aside(cfg, run.get("run_id"), inside, why, log)
    os.makedirs(root, exist_ok=True)
    write_json_atomic(os.path.join(root, RUN_FILE), {"run_id": plan.run_id, "finished_step": None})


def mark_finished(cfg: TrainConfig, run_id: str, step: int) -> None:
    """After the export: a plain rerun of the same command then leaves the finished run alone."""
    write_json_atomic(os.path.join(checkpoint_root(cfg), RUN_FILE), {"run_id": run_id, "finished_step": step})


def load_resumable(engine, plan: ResumePlan) -> None:
    use_safe_loading(engine)
    root, tag = os.path.split(plan.directory)
    loaded, _ = engine.load_checkpoint(root, tag=tag, load_module_strict=False)
    if loaded is None:
        raise ResumeError(f"--resume: {plan.directory} could not be loaded")


def rewind_metrics(save_path: str, step: int) -> None:
    """Drop metrics.jsonl lines past the resumed step (the killed run wrote them; they are written again)."""
    path = os.path.join(save_path, "metrics.jsonl")
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by the kill
    write_text_atomic(path, "".join(kept))


# -- resuming with other settings ---------------------------------------------------------------------------
# Settings a resumed run may change without changing what it trains: how long, and what it logs.
RESUME_FREE_SETTINGS = frozenset(
    {
        "max_steps",
        "max_epochs",
        "resume",
        "save_path",
        "save_steps",
        "max_ckpt_num",
        "logging_steps",
        "eval_dataset",
        "eval_steps",
        "eval_max_samples",
        "max_new_tokens",
        "debug_mode",
        "debug_every_steps",
        "debug_max_print_tokens",
        "use_tensorboard",
        "use_wandb",
        "wandb_project",
        "resume_changed_inputs",
        "data_workers",
    }
)


def changed_settings(saved: dict, current: dict) -> list[str]:
    """'name old -> new' for each setting that differs from the run a checkpoint was saved by."""
    return [
        f"{name} {saved[name]!r} -> {current.get(name)!r}"
        for name in sorted(saved)
        if name not in RESUME_FREE_SETTINGS and saved[name] != current.get(name)
    ]
