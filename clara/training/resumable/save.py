"""Saving a resumable checkpoint: DeepSpeed's files and trainer_state.json are written into tmp_step_N; a
BackgroundPublisher then fsyncs them, writes the manifest and renames the directory to step_N, so that
training does not wait for the disk."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from clara.errors import RunFailure
from clara.files import fsync_path, write_json_atomic
from clara.parallel.distributed import local_shard
from clara.parallel.zero3 import full_numel
from clara.training.resumable.files import (
    STATE_FILE,
    CheckpointSettings,
    TrainState,
    checkpoint_bytes,
    checkpoint_root,
    complete_checkpoints,
    write_manifest,
)


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of trained parameters holding inf or NaN."""
    return [
        name for name, p in module.named_parameters() if p.requires_grad and not torch.isfinite(local_shard(p)).all()
    ]


def _expected_bytes(root: str, module: torch.nn.Module) -> int:
    """What the next checkpoint needs: the newest one's size, or the trained weights plus fp32 Adam state."""
    found = complete_checkpoints(root)
    try:
        if found:
            return checkpoint_bytes(os.path.join(root, found[-1][1]))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # an older layout, or rotated away by rank 0 meanwhile: estimate instead
    trained = [p for p in module.parameters() if p.requires_grad]
    return sum(full_numel(p) * (p.element_size() + 12) for p in trained) + 2**20


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**27 else f"{n / 2**20:.1f} MB"


def _out_of_space(save_path: str, needed: int, free: int, tag: str, root: str) -> RunFailure:
    found = complete_checkpoints(root)
    kept = f"the newest checkpoint {os.path.join(root, found[-1][1])} is intact" if found else "no checkpoint was kept"
    return RunFailure(
        f"SAVE_PATH={save_path}: no space for the resumable checkpoint {tag}: it needs about "
        f"{_gb(needed)}, {_gb(free)} are free; {kept}. Free some space (or set SAVE_PATH "
        "elsewhere) and run the same command again to resume"
    )


@dataclass
class BackgroundPublisher:
    """Runs the durable part of a save (checksums, fsync, the rename, rotation) in a thread while training goes
    on; the caller owns it and joins it before the next save, the last one and a signal's save."""

    thread: threading.Thread | None = None
    failures: list[BaseException] = field(default_factory=list)

    def start(self, publish: Callable[[], None], name: str) -> None:
        """Run `publish` in the background; what it raises is kept for join()."""
        self.join()
        self.thread = threading.Thread(target=self._record_failure, args=(publish,), name=name)
        self.thread.start()

    def join(self) -> None:
        """Block until the last checkpoint is published; raise what went wrong publishing it."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.failures:
            raise self.failures.pop(0)

    def _record_failure(self, publish: Callable[[], None]) -> None:
        try:
            publish()
        except (OSError, RuntimeError) as error:  # RunFailure (disk full) is a RuntimeError
            self.failures.append(error)


def save_resumable(
    engine,
    state: TrainState,
    checkpoints: CheckpointSettings,
    settings: dict,
    rank: int,
    run_id: str,
    publisher: BackgroundPublisher | None = None,
    wait: bool = False,
    inputs: dict | None = None,
) -> str:
    """Save model, optimizer, scheduler and TrainState; the directory appears under its final name only when whole.

    `settings` (every setting of the run, as plain data) and `inputs` are recorded beside the TrainState, for
    what a resume checks.

    Refuses non-finite weights and a disk without room for the checkpoint; a failed write leaves no
    partial directory, and the previous checkpoints stay untouched. The files are written here; they
    are made durable and published by `publisher` in the background (its next save, or wait=True, waits
    for that); without a publisher, before this returns.
    """
    publisher = publisher if publisher is not None else BackgroundPublisher()
    publisher.join()
    bad = nonfinite_parameters(engine.module)
    if bad:
        raise RunFailure(f"step {state.global_step}: the trained weights hold inf/NaN ({bad[0]}); not saved")
    root = checkpoint_root(checkpoints.save_path)
    tag = f"step_{state.global_step}"
    tmp_tag = f"tmp_{tag}"
    tmp_dir = os.path.join(root, tmp_tag)
    os.makedirs(root, exist_ok=True)
    needed = _expected_bytes(root, engine.module)
    free = shutil.disk_usage(root).free
    room = torch.tensor([float(free >= needed)], device=next(engine.module.parameters()).device)
    dist.all_reduce(room, op=dist.ReduceOp.MIN)
    if room.item() == 0:
        raise _out_of_space(checkpoints.save_path, needed, free, tag, root)
    local_first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if rank == 0 and os.path.isdir(tmp_dir):
        shutil.rmtree(tmp_dir)
    dist.barrier()
    trainer_state = {
        "run_id": run_id,
        "train_state": dataclasses.asdict(state),
        "settings": settings,
        "inputs": inputs,
    }
    try:
        engine.save_checkpoint(root, tag=tmp_tag, client_state={}, save_latest=False, exclude_frozen_parameters=True)
        if rank == 0:
            write_json_atomic(os.path.join(tmp_dir, STATE_FILE), trainer_state)
        dist.barrier()
        # A node that does not share SAVE_PATH with rank 0 does not see its trainer_state.json: it
        # publishes its own copy. Every node decides before any rename.
        own_copy = local_first and rank != 0 and not os.path.exists(os.path.join(tmp_dir, STATE_FILE))
        if own_copy:
            write_json_atomic(os.path.join(tmp_dir, STATE_FILE), trainer_state)
        dist.barrier()
    except (OSError, RuntimeError) as error:
        _clean_up_failed_save(error, checkpoints.save_path, tmp_dir, tag, needed, remove=local_first)
        raise
    if rank == 0 or own_copy:
        publisher.start(lambda: _publish_or_raise(checkpoints, tmp_tag, tag, needed), name=f"publish {tag}")
    if wait:
        publisher.join()
    return os.path.join(root, tag)


def _clean_up_failed_save(
    error: BaseException, save_path: str, tmp_dir: str, tag: str, needed: int, remove: bool
) -> None:
    """Remove the partial directory; raise RunFailure (from `error`) when the disk is full."""
    root = os.path.dirname(tmp_dir)
    free = shutil.disk_usage(root).free
    if remove and os.path.isdir(tmp_dir):
        shutil.rmtree(tmp_dir)
    if getattr(error, "errno", None) == errno.ENOSPC or free < needed:
        # PyTorch's writer reports a full disk as "basic_ios::clear: iostream error", without an errno.
        raise _out_of_space(save_path, needed, free, tag, root) from error


def _publish_or_raise(checkpoints: CheckpointSettings, tmp_tag: str, tag: str, needed: int) -> None:
    root = checkpoint_root(checkpoints.save_path)
    try:
        _publish(root, tmp_tag, tag, checkpoints.max_ckpt_num)
    except (OSError, RuntimeError) as error:
        _clean_up_failed_save(error, checkpoints.save_path, os.path.join(root, tmp_tag), tag, needed, remove=True)
        raise


def _publish(root: str, tmp_tag: str, tag: str, keep: int) -> None:
    write_manifest(os.path.join(root, tmp_tag))
    final = os.path.join(root, tag)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(os.path.join(root, tmp_tag), final)
    fsync_path(root)
    for _, old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(os.path.join(root, old))
