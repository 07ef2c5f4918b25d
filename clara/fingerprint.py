"""What a run's inputs are, as keys: the data a stage trains on, and the base model it starts from.

One definition serves two readers: the prepared-data cache is keyed by `data_key` (a changed file or
setting prepares again), and a resumable checkpoint records both keys so that a resume onto changed
inputs is refused with a line saying what changed (README: "Runs you cannot lose").
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from clara.config import HUB_PREFIX, split_paths

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


# -- the keys of a training run ------------------------------------------------------------------------------
# The settings that decide which records train, and how each is cut: a change prepares the data again, and
# makes a saved data position (epoch order, step in epoch) belong to other data.
DATA_SETTINGS = ("max_len", "doc_max_length", "compress_rate", "generation_top_k", "bad_samples", "max_samples")


def _hub_cache() -> Path:
    """huggingface_hub's cache folder, found as it finds it (without importing it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _hub_source(spec: str) -> dict:
    """A Hub data set by its cached revision (a commit pins every file), a local Hub-layout folder by its files."""
    name = spec[len(HUB_PREFIX):].split(":")[0]
    if os.path.isdir(name):
        files = sorted(str(p) for p in Path(name).rglob("*") if p.is_file() and ".cache" not in p.parts)
        return {"hf": spec, "files": [file_identity(f) for f in files]}
    ref = _hub_cache() / f"datasets--{name.replace('/', '--')}" / "refs" / "main"
    return {"hf": spec, "revision": ref.read_text().strip() if ref.is_file() else None}


def train_data_key(cfg) -> dict:
    """`data_key` of a TrainConfig's DATASET: the files (or the Hub data set's revision), the stage, the model
    whose tokenizer measures the records, and DATA_SETTINGS. Shared by the prepared-data cache and resuming."""
    if cfg.dataset.strip().startswith(HUB_PREFIX):
        sources = [_hub_source(cfg.dataset.strip())]
    else:
        sources = [file_identity(path) for path in split_paths(cfg.dataset)]
    return data_key(sources, cfg.stage, cfg.model_path, {name: getattr(cfg, name) for name in DATA_SETTINGS})


def train_inputs(cfg, base_dir: str) -> dict:
    """What a resumable checkpoint records of its inputs: the data key, and the keys of the base model (at
    `base_dir`, the local folder of MODEL_PATH) and of PRETRAIN_CHECKPOINT."""
    return {"data": train_data_key(cfg),
            "model": {"base": model_key(base_dir),
                      "pretrain_checkpoint": model_key(cfg.pretrain_checkpoint) if cfg.pretrain_checkpoint else None}}


def _readable(inputs: dict) -> dict:
    """The inputs under the names a user knows (DATASET, MAX_LEN, MODEL_PATH ...), values short."""
    data = inputs["data"]
    files = {}
    for source in data["sources"]:
        if "hf" in source:
            files[source["hf"]] = source.get("revision") or [f"{f['path']}: {f['size']} bytes"
                                                             for f in source.get("files", [])]
        else:
            changed = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(source["mtime_ns"] / 1e9))
            files[source["path"]] = f"{source['size']} bytes, modified {changed}"
    readable = {"DATASET": files, "STAGE": data["stage"], "tokenizer of": data["tokenizer"]}
    readable.update({name.upper(): value for name, value in data["settings"].items()})
    for name, key in (("MODEL_PATH", inputs["model"]["base"]),
                      ("PRETRAIN_CHECKPOINT", inputs["model"]["pretrain_checkpoint"])):
        if key and "weights" in key:
            key = {"config.json": (key["config_sha256"] or "")[:12],
                   **{file: digest[:12] for file, digest in key["weights"].items()}}
        readable[name] = key
    return readable


def input_changes(saved: dict | None, current: dict) -> list[str]:
    """What differs between the inputs a checkpoint recorded and the current ones, as 'NAME: old -> new'
    (none for a checkpoint that recorded none)."""
    if not saved:
        return []
    return what_changed(_readable(saved), _readable(current))
