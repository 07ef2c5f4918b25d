"""What a run's inputs are, as keys: the data a stage trains on, and the base model it starts from.

One definition serves two readers: the prepared-data cache is keyed by `data_key` (a changed file or
setting prepares again), and a resumable checkpoint records both keys so that a resume onto changed
inputs is refused with a line saying what changed (README: "Runs you cannot lose").
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# Bytes read from each end of a weight file for the model key: enough to tell a retrained or replaced
# file, cheap for a 60 GB base. The file's size is part of the key as well.
SAMPLE_BYTES = 1 << 20


def file_identity(path: str) -> dict:
    """A local file as the data key sees it: absolute path, size and modification time (not its content)."""
    info = os.stat(path)
    return {"path": os.path.abspath(path), "size": info.st_size, "mtime_ns": info.st_mtime_ns}


def content_digest(path: str) -> str:
    """sha256 of a whole file (Hub files, whose cache copies may be rewritten with a new time)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_key(sources: list[dict], stage_name: str, tokenizer: str, settings: dict) -> dict:
    """The key of a prepared data set: its sources (`file_identity` rows, or Hub rows with a content digest),
    the stage that reads them, the tokenizer that counts their tokens and the settings the checks read."""
    return {"sources": sources, "stage": stage_name, "tokenizer": tokenizer, "settings": dict(sorted(settings.items()))}


def _sample_digest(path: Path) -> str:
    """sha256 of a file's size and its first and last SAMPLE_BYTES."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            handle.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def model_key(model_path: str) -> dict:
    """The key of a local base model folder: its config.json and a sample of each weight file.

    A Hub id that is not a local folder is keyed by its name (the Hub's own revision pins it)."""
    folder = Path(model_path)
    if not folder.is_dir():
        return {"model": model_path}
    config = folder / "config.json"
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    return {"model": os.path.abspath(model_path),
            "config_sha256": content_digest(str(config)) if config.is_file() else None,
            "weights": {p.name: _sample_digest(p) for p in weights}}


def key_digest(key: dict) -> str:
    """A short stable name for a key (the cache folder's name)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def what_changed(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """The fields that differ between two keys, as dotted names with both values (for the refusal line)."""
    changes = []
    for name in sorted(set(saved) | set(current)):
        old, new = saved.get(name), current.get(name)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            changes += what_changed(old, new, f"{prefix}{name}.")
        else:
            changes.append(f"{prefix}{name}: {json.dumps(old)} -> {json.dumps(new)}")
    return changes
