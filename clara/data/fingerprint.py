"""What a run's inputs are, as keys: the data a stage trains on, and the base model it starts from.

One definition serves two readers: the prepared-data cache is keyed by `data_key` (a changed file or
setting prepares again), and a resumable checkpoint records both keys so that a resume onto changed
inputs is refused with a line saying what changed (README: "Runs you cannot lose").
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from clara.config import TINY_MODEL_NAME, recorded_base
from clara.data.spec import DataSource, HubSource, JsonlFiles
from clara.errors import CheckpointError

# Bytes read from each end of a weight file for the model key: enough to tell a retrained or replaced
# file, cheap for a 60 GB base. The file's size is part of the key as well.
SAMPLE_BYTES = 1 << 20


def file_identity(path: str) -> dict:
    """A local file as the data key sees it: absolute path, size and modification time (not its content)."""
    info = os.stat(path)
    return {"path": os.path.abspath(path), "size": info.st_size, "mtime_ns": info.st_mtime_ns}


def content_digest(path: str) -> str:
    """sha256 of a whole file (Hub files, whose cache copies may be rewritten with a new time)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


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
    return {
        "model": os.path.abspath(model_path),
        "config_sha256": content_digest(str(config)) if config.is_file() else None,
        "weights": {p.name: _sample_digest(p) for p in weights},
    }


# -- the base model a checkpoint records ---------------------------------------------------------------------
def base_model_key(model_path: str) -> dict:
    """The model key of a base as MODEL_PATH names it ('tiny': the shipped tiny model's folder); checkpoints
    and exports record it as `base_model_key`, next to the name."""
    return model_key(str(TINY_MODEL_DIR) if model_path == TINY_MODEL_NAME else model_path)


def _content(key: dict) -> dict | None:
    """What identifies a base's weights in its key (the folder's path does not: a copy is the same base)."""
    return {"config_sha256": key["config_sha256"], "weights": key["weights"]} if "weights" in key else None


def _short(key: dict) -> str:
    """config.json and the weight files of a key, their digests cut short, for the refusal line."""
    parts = [f"config.json {(key['config_sha256'] or 'none')[:12]}"]
    parts += [f"{name} {digest[:12]}" for name, digest in key["weights"].items()]
    return ", ".join(parts)


def _local_config(model_path: str) -> dict | None:
    """A base's config.json: in its folder, or in the Hub cache for a Hub id (nothing is downloaded)."""
    path = TINY_MODEL_DIR / "config.json" if model_path == TINY_MODEL_NAME else Path(model_path) / "config.json"
    if not path.is_file() and not Path(model_path).is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache  # deferred: the Hub client is needed only here

            cached = try_to_load_from_cache(model_path, "config.json")
        except Exception:  # not a valid repo id either
            cached = None
        path = Path(cached) if isinstance(cached, str) else path
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version")}


def check_base_model(model_path: str, checkpoint: str | None, warn=None) -> None:
    """Refuse a MODEL_PATH other than the base a local PRETRAIN_CHECKPOINT was trained on (CheckpointError,
    one line naming both), by the base-model key it records: config.json and sampled weights, so a copy of
    the base passes and a retrained one does not. A checkpoint that records only a name or path (older
    native ones, the official release) is compared by config.json, and a difference only warned about."""
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    config_path = Path(checkpoint or "") / "config.json"
    if not checkpoint or not config_path.is_file():
        return
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # loading the checkpoint names what is wrong with it
    recorded = recorded_base(checkpoint)
    if recorded is None or model_path == recorded == TINY_MODEL_NAME:
        return  # the built-in model: its recorded tiny_version decides which build loads
    saved = _content(config.get("base_model_key") or {})
    current = _content(base_model_key(model_path)) if saved else None
    if saved and current:
        if saved != current and model_path == recorded:
            raise CheckpointError(
                f"MODEL_PATH={model_path} changed since PRETRAIN_CHECKPOINT={checkpoint} was trained on it: "
                f"now {_short(current)}, then {_short(saved)}; point MODEL_PATH at the base it was trained on"
            )
        if saved != current:
            raise CheckpointError(
                f"MODEL_PATH={model_path} ({_short(current)}) is not the base model PRETRAIN_CHECKPOINT={checkpoint} "
                f"was trained on: {recorded} ({_short(saved)}); leave MODEL_PATH unset to use the recorded base"
            )
        return
    if model_path == recorded:
        return
    ours, theirs = _local_config(model_path), _local_config(recorded)
    if ours is None or theirs is None:
        warn(
            f"Warning: PRETRAIN_CHECKPOINT={checkpoint} was trained on {recorded}; MODEL_PATH={model_path} could "
            "not be compared with it (no config.json of both here): make sure it is the same model"
        )
    elif ours != theirs:
        fields = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        warn(
            f"Warning: PRETRAIN_CHECKPOINT={checkpoint} was trained on {recorded}, whose config.json differs from "
            f"MODEL_PATH={model_path}'s ({', '.join(fields[:5])}): the checkpoint may not load or may load wrongly"
        )


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


# -- the data key of a run -----------------------------------------------------------------------------------
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
TINY_MODEL_DIR = Path(__file__).resolve().parent.parent / "tiny_model"


def _hub_file_identity(path: str) -> dict:
    """A Hub data file: a copy in the Hugging Face cache is a link to a blob named by its content's hash,
    which is its identity; a file elsewhere (a local folder in the Hub layout) is keyed as a local file."""
    real = os.path.realpath(path)
    if os.path.basename(os.path.dirname(real)) == "blobs":
        return {"name": os.path.basename(path), "blob": os.path.basename(real)}
    return file_identity(path) if os.path.isfile(path) else {"url": path}


def source_identities(source: DataSource, streaming: bool = False) -> list[dict]:
    """The sources of a data setting (JSONL files, or a Hub configuration) as key rows."""
    if isinstance(source, JsonlFiles):
        return [file_identity(path) for path in source.paths]
    from clara.data.hub import hub_files  # deferred: resolving a Hub configuration loads `datasets`

    label, files = hub_files(source, streaming=streaming)
    return [{"hub": label, "files": [_hub_file_identity(f) for f in files]}]


def tokenizer_identity(source: str) -> dict:
    """A tokenizer as the data key sees it: a folder's tokenizer files by content, a Hub id by name."""
    folder = TINY_MODEL_DIR if source == "tiny" else Path(source)
    if not folder.is_dir():
        return {"tokenizer": source}
    files = {name: content_digest(str(folder / name)) for name in TOKENIZER_FILES if (folder / name).is_file()}
    return {"tokenizer": os.path.abspath(folder), "files": files}


def train_data_key(
    source: DataSource, stage_name: str, model_path: str, pretrain_checkpoint: str | None, settings: dict
) -> dict:
    """The key of a run's training data: the files of `source`, the stage, the tokenizer that counts the
    tokens (PRETRAIN_CHECKPOINT's when it holds one, else MODEL_PATH's) and `settings`, those that decide
    which records train (clara.config.data_settings). The prepared-data cache is keyed by it, and a
    resumable checkpoint records it."""
    tokenizer = (
        pretrain_checkpoint
        if pretrain_checkpoint and any((Path(pretrain_checkpoint) / name).is_file() for name in TOKENIZER_FILES)
        else model_path
    )
    hub_prefix = isinstance(source, HubSource) and settings["max_samples"] is not None
    return data_key(
        source_identities(source, streaming=hub_prefix), stage_name, tokenizer_identity(tokenizer), settings
    )


def train_inputs(data: dict, base_dir: str, pretrain_checkpoint: str | None) -> dict:
    """What a resumable checkpoint records of its inputs: the data key `data` (train_data_key), and the keys
    of the base model (at `base_dir`, the local folder of MODEL_PATH) and of PRETRAIN_CHECKPOINT."""
    return {
        "data": data,
        "model": {
            "base": model_key(base_dir),
            "pretrain_checkpoint": model_key(pretrain_checkpoint) if pretrain_checkpoint else None,
        },
    }


def _readable_file(row: dict) -> str:
    """A data file's key row, short: a Hub blob by its hash, a local file by size and modification time."""
    if "blob" in row:
        return f"blob {row['blob'][:12]}"
    if "mtime_ns" in row:
        changed = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["mtime_ns"] / 1e9))
        return f"{row['size']} bytes, modified {changed}"
    return row.get("url", "")


def _readable(inputs: dict) -> dict:
    """The inputs under the names a user knows (DATASET, MAX_LEN, MODEL_PATH ...), values short."""
    data = inputs["data"]
    files = {}
    for source in data["sources"]:
        if "hub" in source:
            files[source["hub"]] = {
                row.get("name") or row.get("path") or row.get("url"): _readable_file(row) for row in source["files"]
            }
        else:
            files[source["path"]] = _readable_file(source)
    tokenizer = data["tokenizer"]
    readable = {
        "DATASET": files,
        "STAGE": data["stage"],
        "tokenizer": {
            "from": tokenizer["tokenizer"],
            **{name: digest[:12] for name, digest in tokenizer.get("files", {}).items()},
        },
    }
    readable.update({name.upper(): value for name, value in data["settings"].items()})
    for name, key in (
        ("MODEL_PATH", inputs["model"]["base"]),
        ("PRETRAIN_CHECKPOINT", inputs["model"]["pretrain_checkpoint"]),
    ):
        if key and "weights" in key:
            key = {
                "config.json": (key["config_sha256"] or "")[:12],
                **{file: digest[:12] for file, digest in key["weights"].items()},
            }
        readable[name] = key
    return readable


def input_changes(saved: dict | None, current: dict) -> list[str]:
    """What differs between the inputs a checkpoint recorded and the current ones, as 'NAME: old -> new'
    (none for a checkpoint that recorded none)."""
    if not saved:
        return []
    return what_changed(_readable(saved), _readable(current))
