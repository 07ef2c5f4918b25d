"""Resumable checkpoints under $SAVE_PATH/checkpoints: saving, publishing, rotating, verifying and
choosing the one to resume from. The exported model (the checkpoint format) lives in clara.checkpoint.

Layout:
  checkpoints/run.json                    the run this SAVE_PATH continues: {"run_id", "finished_step"}
  checkpoints/step_N/                     DeepSpeed's files (model, ZeRO optimizer partitions, scheduler)
  checkpoints/step_N/trainer_state.json   TrainState, run id and settings (JSON, never a pickle)
  checkpoints/step_N/manifest.json        written last: every other file with its size and SHA-256
  previous_runs/<time>-<run id>/          what a fresh start moved aside (checkpoints, metrics.jsonl)

A save writes DeepSpeed's files and trainer_state.json into tmp_step_N; a background thread then
fsyncs them, writes the manifest and renames the directory to step_N (the next save, the last one
and a signal's save wait for it), so training does not wait for the disk.

Nothing read back can run code: DeepSpeed's .pt files are read with torch.load(weights_only=True)
and an allow-list of the few non-tensor types they hold, both by a check before the model loads
and by DeepSpeed's own reads (see use_safe_loading).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from clara.checkpoint import resolve_base_path
from clara.config import CHECKPOINT_MANIFEST, CHECKPOINT_STATE, TrainConfig
from clara.distributed import broadcast, local_shard
from clara.errors import ResumeError, RunFailure
from clara.files import fsync_path, write_json_atomic
from clara.fingerprint import input_changes, train_inputs
from clara.locks import record_run_id

CHECKPOINT_DIR = "checkpoints"
PREVIOUS_RUNS_DIR = "previous_runs"
RUN_FILE = "run.json"
MANIFEST = CHECKPOINT_MANIFEST
STATE_FILE = CHECKPOINT_STATE


@dataclass
class TrainState:
    """Where the run is; saved with every resumable checkpoint."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    consumed_samples: int = 0
    nonfinite_in_a_row: int = 0
    skipped_steps: int = 0


def checkpoint_root(cfg: TrainConfig) -> str:
    return os.path.join(cfg.save_path, CHECKPOINT_DIR)


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, tag) of the published checkpoints, oldest first. Unfinished ones carry a tmp_ prefix."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(root) if (m := re.fullmatch(r"step_(\d+)", name))]
    return sorted(found)


# -- files on disk ------------------------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _files_below(directory: str) -> list[str]:
    found = []
    for parent, _, names in os.walk(directory):
        found += [os.path.relpath(os.path.join(parent, name), directory) for name in names]
    return sorted(found)


def write_manifest(directory: str) -> int:
    """Fsync every file of a finished checkpoint directory, then record them in manifest.json; returns the bytes."""
    files = {}
    for name in _files_below(directory):
        path = os.path.join(directory, name)
        fsync_path(path)
        files[name] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    write_json_atomic(os.path.join(directory, MANIFEST), {"files": files})
    return sum(entry["size"] for entry in files.values())


def manifest_problem(directory: str) -> str | None:
    """Why a checkpoint directory is not whole (a missing, resized or changed file), or None."""
    try:
        files = _read_json(os.path.join(directory, MANIFEST))["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (unfinished, or written by an older clara)"
    except (ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST} is unreadable ({error})"
    for name, entry in files.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != entry["size"]:
            return f"{name} has {os.path.getsize(path)} bytes, the manifest says {entry['size']}"
        if _sha256(path) != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    if STATE_FILE not in files:
        return f"the manifest does not list {STATE_FILE}"
    return None


def checkpoint_bytes(directory: str) -> int:
    return sum(entry["size"] for entry in _read_json(os.path.join(directory, MANIFEST))["files"].values())


# -- reading DeepSpeed's files without running code ---------------------------------------------------------
def _allowed_types() -> list:
    """The non-tensor types DeepSpeed's ZeRO 0-2 checkpoint files hold, besides what weights_only allows anyway."""
    # Deferred: deepspeed is heavy to import and only the trainer process needs it.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str, map_location=None, mmap: bool = False):
    """torch.load that refuses any pickle global outside the allow-list: a planted payload never runs."""
    try:
        with torch.serialization.safe_globals(_allowed_types()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        # torch's message is several lines of advice (including weights_only=False); keep what was refused.
        found = re.search(r"Unsupported (global: GLOBAL \S+|operand \S+)", str(error))
        reason = found.group(0) if found else "not a weights-only pickle"
        raise ResumeError(f"{path}: refused to load: it holds something other than tensors and plain data "
                          f"({reason}); a resumable checkpoint never does, so it may have been planted. "
                          "Nothing was run; delete the directory") from None


def check_loadable(directory: str) -> None:
    """Read every .pt file of a checkpoint the safe way (memory-mapped where possible: cheap) before the model loads."""
    for name in _files_below(directory):
        path = os.path.join(directory, name)
        if not name.endswith(".pt"):
            continue
        try:
            safe_torch_load(path, map_location="cpu", mmap=zipfile.is_zipfile(path))
        except ResumeError:
            raise
        except (RuntimeError, EOFError, ValueError) as error:
            # The manifest matched, so the file is as written: by something other than DeepSpeed.
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ResumeError(f"{path}: not a readable checkpoint file ({reason})") from None


def use_safe_loading(engine) -> None:
    """Make DeepSpeed read checkpoints through safe_torch_load.

    DeepSpeed's TorchCheckpointEngine.load unpickles with weights_only=False, and every read of a
    ZeRO 0-2 checkpoint (model states, optimizer partitions) goes through engine.checkpoint_engine.load.
    """
    engine.checkpoint_engine.load = lambda path, map_location=None: safe_torch_load(path, map_location)


# -- which run, and where to start --------------------------------------------------------------------------
@dataclass
class ResumePlan:
    """What every rank does at the start: resume from `directory` (None: start over) as run `run_id`."""

    run_id: str
    directory: str | None = None
    state: TrainState | None = None
    settings: dict | None = None
    finished: bool = False  # the checkpoint is the run's last step and its model was exported
    inputs: dict | None = None  # this run's data and model keys (clara.fingerprint.train_inputs), saved with it
    data_changed: bool = False  # resumed onto other data (RESUME_CHANGED_INPUTS): its position is recomputed


def _new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


def _read_run(root: str) -> dict:
    path = os.path.join(root, RUN_FILE)
    try:
        return _read_json(path)
    except FileNotFoundError:
        return {}
    except ValueError:
        return {}  # a torn run.json: the checkpoints' own run ids decide


def _read_state(directory: str) -> dict:
    path = os.path.join(directory, STATE_FILE)
    try:
        saved = _read_json(path)
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
        raise ResumeError(f"--resume={cfg.resume}: not a resumable checkpoint directory (no {MANIFEST}); "
                          "expected auto, false, or $SAVE_PATH/checkpoints/step_N")
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
    finished = (cfg.resume == "auto" and state.global_step >= total_steps
                and run.get("finished_step") == state.global_step)
    changes = [] if finished else input_changes(saved.get("inputs"), inputs)
    if changes and not cfg.resume_changed_inputs:
        raise ResumeError(f"{directory} was saved by a run on other inputs ({'; '.join(changes)}): its data position "
                          "and weights belong to those. RESUME=false starts over; RESUME_CHANGED_INPUTS=true "
                          f"continues this run on the new inputs (the epoch order recomputed for the new data from "
                          f"step {state.global_step} on)")
    if changes:
        log(f"Warning: resuming onto changed inputs (RESUME_CHANGED_INPUTS=true): {'; '.join(changes)}")
    data_changed = bool(saved.get("inputs")) and saved["inputs"]["data"] != inputs["data"]
    return ResumePlan(run_id=saved["run_id"], directory=directory, state=state, settings=saved.get("settings", {}),
                      finished=finished, inputs=inputs, data_changed=data_changed)


def _move_aside(cfg: TrainConfig, old_run: str | None, keep: str | None, why: str, log) -> None:
    """Move everything of another run out of checkpoints/ (and its metrics.jsonl) into previous_runs/."""
    root = checkpoint_root(cfg)
    names = sorted(n for n in (os.listdir(root) if os.path.isdir(root) else [])
                   if keep is None or os.path.join(os.path.abspath(root), n) != os.path.abspath(keep))
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
    log(f"{why}: moved the previous run's resumable checkpoints ({', '.join(steps) or 'none complete'}) "
        f"aside to {target}")


def plan_run(cfg: TrainConfig, total_steps: int, rank: int, world: int, log) -> ResumePlan:
    """Decide on rank 0 where the run starts, and make SAVE_PATH hold this run's checkpoints only.

    A fresh start (RESUME=false, or nothing of the current run to resume) moves the checkpoints of
    any other run aside before the first save; so does resuming a checkpoint of another run.
    Called before the model loads: a damaged or planted checkpoint is reported without that cost.
    """
    decision = None
    if rank == 0:
        try:
            inputs = train_inputs(cfg, resolve_base_path(cfg.model_path))
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
            _adopt_run(cfg, plan, log if rank == 0 else (lambda *_: None))
        if world > 1:
            dist.barrier()
    return plan


def _adopt_run(cfg: TrainConfig, plan: ResumePlan, log) -> None:
    root = checkpoint_root(cfg)
    run = _read_run(root)
    if run.get("run_id") == plan.run_id:
        return
    inside = (plan.directory if plan.directory
              and os.path.dirname(os.path.abspath(plan.directory)) == os.path.abspath(root) else None)
    if plan.directory is None or run:
        why = "RESUME=false" if cfg.resume == "false" else "Starting over" if plan.directory is None else \
            f"Resuming run {plan.run_id}"
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
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        out.writelines(kept)
    fsync_path(tmp)
    os.replace(tmp, path)


# -- saving -------------------------------------------------------------------------------------------------
def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of trained parameters holding inf or NaN."""
    return [name for name, p in module.named_parameters()
            if p.requires_grad and not torch.isfinite(local_shard(p)).all()]


def _expected_bytes(root: str, module: torch.nn.Module) -> int:
    """What the next checkpoint needs: the newest one's size, or the trained weights plus fp32 Adam state."""
    found = complete_checkpoints(root)
    try:
        if found:
            return checkpoint_bytes(os.path.join(root, found[-1][1]))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # an older layout, or rotated away by rank 0 meanwhile: estimate instead
    trained = [p for p in module.parameters() if p.requires_grad]
    return sum(getattr(p, "ds_numel", p.numel()) * (p.element_size() + 12) for p in trained) + 2**20


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**27 else f"{n / 2**20:.1f} MB"


def _out_of_space(cfg: TrainConfig, needed: int, free: int, tag: str, root: str) -> RunFailure:
    found = complete_checkpoints(root)
    kept = f"the newest checkpoint {os.path.join(root, found[-1][1])} is intact" if found else "no checkpoint was kept"
    return RunFailure(f"SAVE_PATH={cfg.save_path}: no space for the resumable checkpoint {tag}: it needs about "
                      f"{_gb(needed)}, {_gb(free)} are free; {kept}. Free some space (or set SAVE_PATH "
                      "elsewhere) and run the same command again to resume")


# The durable part of a save (checksums, fsync, the rename, rotation) runs in this thread while training goes on.
_publishing: threading.Thread | None = None
_publish_failures: list[BaseException] = []


def wait_for_saves() -> None:
    """Block until the last checkpoint is published; raise what went wrong publishing it."""
    global _publishing
    if _publishing is not None:
        _publishing.join()
        _publishing = None
    if _publish_failures:
        raise _publish_failures.pop(0)


def save_resumable(engine, state: TrainState, cfg: TrainConfig, rank: int, run_id: str, wait: bool = False,
                   inputs: dict | None = None) -> str:
    """Save model, optimizer, scheduler and TrainState; the directory appears under its final name only when whole.

    Refuses non-finite weights and a disk without room for the checkpoint; a failed write leaves no
    partial directory, and the previous checkpoints stay untouched. The files are written here; they
    are made durable and published in the background (the next save, or wait=True, waits for that).
    """
    global _publishing
    wait_for_saves()
    bad = nonfinite_parameters(engine.module)
    if bad:
        raise RunFailure(f"step {state.global_step}: the trained weights hold inf/NaN ({bad[0]}); not saved")
    root = checkpoint_root(cfg)
    tag = f"step_{state.global_step}"
    tmp_tag = f"tmp_{tag}"
    tmp_dir = os.path.join(root, tmp_tag)
    os.makedirs(root, exist_ok=True)
    needed = _expected_bytes(root, engine.module)
    free = shutil.disk_usage(root).free
    room = torch.tensor([float(free >= needed)], device=next(engine.module.parameters()).device)
    dist.all_reduce(room, op=dist.ReduceOp.MIN)
    if room.item() == 0:
        raise _out_of_space(cfg, needed, free, tag, root)
    local_first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if rank == 0 and os.path.isdir(tmp_dir):
        shutil.rmtree(tmp_dir)
    dist.barrier()
    trainer_state = {"run_id": run_id, "train_state": dataclasses.asdict(state), "settings": cfg.to_dict(),
                     "inputs": inputs}
    try:
        engine.save_checkpoint(root, tag=tmp_tag, client_state={}, save_latest=False, exclude_frozen_parameters=True)
        if rank == 0:
            _write_json(os.path.join(tmp_dir, STATE_FILE), trainer_state)
        dist.barrier()
        # A node that does not share SAVE_PATH with rank 0 does not see its trainer_state.json: it
        # publishes its own copy. Every node decides before any rename.
        own_copy = local_first and rank != 0 and not os.path.exists(os.path.join(tmp_dir, STATE_FILE))
        if own_copy:
            _write_json(os.path.join(tmp_dir, STATE_FILE), trainer_state)
        dist.barrier()
    except (OSError, RuntimeError) as error:
        _clean_up_failed_save(error, cfg, tmp_dir, tag, needed, remove=local_first)
        raise
    if rank == 0 or own_copy:
        _publishing = threading.Thread(target=_publish_or_record, args=(cfg, tmp_tag, tag, needed),
                                       name=f"publish {tag}")
        _publishing.start()
    if wait:
        wait_for_saves()
    return os.path.join(root, tag)


def _write_json(path: str, obj: dict) -> None:
    # Inside an unpublished directory: the manifest fsyncs it, the directory's rename publishes it.
    with open(path, "w", encoding="utf-8") as out:
        json.dump(obj, out, indent=2)


def _clean_up_failed_save(error: BaseException, cfg: TrainConfig, tmp_dir: str, tag: str, needed: int,
                          remove: bool) -> None:
    """Remove the partial directory; raise RunFailure (from `error`) when the disk is full."""
    root = os.path.dirname(tmp_dir)
    free = shutil.disk_usage(root).free
    if remove and os.path.isdir(tmp_dir):
        shutil.rmtree(tmp_dir)
    if getattr(error, "errno", None) == errno.ENOSPC or free < needed:
        # PyTorch's writer reports a full disk as "basic_ios::clear: iostream error", without an errno.
        raise _out_of_space(cfg, needed, free, tag, root) from error


def _publish_or_record(cfg: TrainConfig, tmp_tag: str, tag: str, needed: int) -> None:
    root = checkpoint_root(cfg)
    try:
        _publish(root, tmp_tag, tag, cfg.max_ckpt_num)
    except (OSError, RuntimeError) as error:
        try:
            _clean_up_failed_save(error, cfg, os.path.join(root, tmp_tag), tag, needed, remove=True)
            _publish_failures.append(error)
        except RunFailure as failure:
            _publish_failures.append(failure)


def _publish(root: str, tmp_tag: str, tag: str, keep: int) -> None:
    write_manifest(os.path.join(root, tmp_tag))
    final = os.path.join(root, tag)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(os.path.join(root, tmp_tag), final)
    fsync_path(root)
    for _, old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(os.path.join(root, old))


# -- resuming with other settings ---------------------------------------------------------------------------
# Settings a resumed run may change without changing what it trains: how long, and what it logs.
RESUME_FREE_SETTINGS = frozenset({
    "max_steps", "max_epochs", "resume", "save_path", "save_steps", "max_ckpt_num", "logging_steps",
    "eval_dataset", "eval_steps", "eval_max_samples", "max_new_tokens", "debug_mode", "debug_every_steps",
    "debug_max_print_tokens", "use_tensorboard", "use_wandb", "wandb_project", "resume_changed_inputs",
    "data_workers"})


def changed_settings(saved: dict, current: dict) -> list[str]:
    """'name old -> new' for each setting that differs from the run a checkpoint was saved by."""
    return [f"{name} {saved[name]!r} -> {current.get(name)!r}" for name in sorted(saved)
            if name not in RESUME_FREE_SETTINGS and saved[name] != current.get(name)]

