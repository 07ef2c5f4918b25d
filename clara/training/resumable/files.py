"""The files of a resumable checkpoint: where they are, the manifest that proves a directory whole, and reading
DeepSpeed's .pt files without running code."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass

import torch

from clara.config import CHECKPOINT_MANIFEST, CHECKPOINT_STATE
from clara.data.fingerprint import content_digest
from clara.errors import ResumeError
from clara.files import fsync_path, read_json, write_json_atomic

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


@dataclass(frozen=True)
class CheckpointSettings:
    """The settings of a run's resumable checkpoints: where they go, which one to resume from, whether a
    resume may change the inputs, and how many are kept."""

    save_path: str
    resume: str  # auto, false, or a checkpoint directory
    resume_changed_inputs: bool
    max_ckpt_num: int


def checkpoint_root(save_path: str) -> str:
    return os.path.join(save_path, CHECKPOINT_DIR)


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, tag) of the published checkpoints, oldest first. Unfinished ones carry a tmp_ prefix."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(root) if (m := re.fullmatch(r"step_(\d+)", name))]
    return sorted(found)


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
        files[name] = {"size": os.path.getsize(path), "sha256": content_digest(path)}
    write_json_atomic(os.path.join(directory, MANIFEST), {"files": files})
    return sum(entry["size"] for entry in files.values())


def manifest_problem(directory: str) -> str | None:
    """Why a checkpoint directory is not whole (a missing, resized or changed file), or None."""
    try:
        files = read_json(os.path.join(directory, MANIFEST))["files"]
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
        if content_digest(path) != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    if STATE_FILE not in files:
        return f"the manifest does not list {STATE_FILE}"
    return None


def checkpoint_bytes(directory: str) -> int:
    return sum(entry["size"] for entry in read_json(os.path.join(directory, MANIFEST))["files"].values())


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
        raise ResumeError(
            f"{path}: refused to load: it holds something other than tensors and plain data "
            f"({reason}); a resumable checkpoint never does, so it may have been planted. "
            "Nothing was run; delete the directory"
        ) from None


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
