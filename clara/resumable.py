"""Resumable checkpoints under $SAVE_PATH/checkpoints: saving, publishing, rotating and finding the
one to resume from. The exported model (the checkpoint format) lives in clara.checkpoint."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from dataclasses import dataclass

import torch.distributed as dist

from clara.config import TrainConfig

CHECKPOINT_DIR = "checkpoints"


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
    """(step, tag) of the finished checkpoints, oldest first. Unfinished ones carry a tmp_ prefix."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(root) if (m := re.fullmatch(r"step_(\d+)", name))]
    return sorted(found)


def save_resumable(engine, state: TrainState, cfg: TrainConfig, rank: int) -> str:
    """Save model, optimizer, scheduler and TrainState; the directory appears under its final name only when whole."""
    root = checkpoint_root(cfg)
    tag = f"step_{state.global_step}"
    tmp_tag = f"tmp_{tag}"
    if rank == 0 and os.path.isdir(os.path.join(root, tmp_tag)):
        shutil.rmtree(os.path.join(root, tmp_tag))
    dist.barrier()
    client_state = {"train_state": dataclasses.asdict(state), "settings": cfg.to_dict()}
    engine.save_checkpoint(root, tag=tmp_tag, client_state=client_state,
                           save_latest=False, exclude_frozen_parameters=True)
    dist.barrier()
    if rank == 0:
        _publish(root, tmp_tag, tag, cfg.max_ckpt_num)
    dist.barrier()
    # Nodes that do not share SAVE_PATH with rank 0 still hold their own unfinished copy.
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and rank != 0 and os.path.isdir(os.path.join(root, tmp_tag)):
        _publish(root, tmp_tag, tag, cfg.max_ckpt_num)
    dist.barrier()
    return os.path.join(root, tag)


def _publish(root: str, tmp_tag: str, tag: str, keep: int) -> None:
    final = os.path.join(root, tag)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(os.path.join(root, tmp_tag), final)
    for _, old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(os.path.join(root, old))


# Settings a resumed run may change without changing what it trains: how long, and what it logs.
RESUME_FREE_SETTINGS = frozenset({
    "max_steps", "max_epochs", "resume", "save_path", "save_steps", "max_ckpt_num", "logging_steps",
    "eval_dataset", "eval_steps", "eval_max_samples", "max_new_tokens", "debug_mode", "debug_every_steps",
    "debug_max_print_tokens", "use_tensorboard", "use_wandb", "wandb_project"})


def changed_settings(saved: dict, current: dict) -> list[str]:
    """'name old -> new' for each setting that differs from the run a checkpoint was saved by."""
    return [f"{name} {saved[name]!r} -> {current.get(name)!r}" for name in sorted(saved)
            if name not in RESUME_FREE_SETTINGS and saved[name] != current.get(name)]


def find_resume_point(cfg: TrainConfig) -> tuple[str, str] | None:
    """(root, tag) to resume from, or None."""
    if cfg.resume == "false":
        return None
    if cfg.resume != "auto":
        path = os.path.abspath(cfg.resume.rstrip("/"))
        return os.path.dirname(path), os.path.basename(path)
    found = complete_checkpoints(checkpoint_root(cfg))
    return (checkpoint_root(cfg), found[-1][1]) if found else None
