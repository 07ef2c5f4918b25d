"""Files written whole or not at all: a crash or a full disk mid-write leaves the previous version in place.
And the one way JSON and JSON-lines files are read and written."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator

from clara.locks import publishing_export


def fsync_path(path: str) -> None:
    """Flush a file's, or a directory's, contents to the disk: a rename publishing it then survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary name to write to; on success it is synced and renamed to `path`, else removed."""
    tmp = f"{path}.tmp{os.getpid()}"  # several nodes may write the same file on a shared file system
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def json_safe(value):
    """`value` with every non-finite float replaced by None: JSON has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_text_atomic(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write(text)


def write_json_atomic(path: str, obj) -> None:
    """`obj` as indented JSON; non-finite floats are refused rather than written as NaN (not JSON)."""
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_jsonl_atomic(path: str, rows: Iterable[dict]) -> None:
    """One JSON object a line, non-ASCII text kept as it is."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_json(path: str):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_jsonl(path: str) -> list[dict]:
    """Every object of a JSON-lines file; blank lines are passed over."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def publish_files(out_dir: str, write: Callable[[str], None]) -> None:
    """`write(folder)` writes a set of files (an export) into a folder aside; they are then moved into `out_dir`
    in one step: a reader holding clara.locks.reading_export sees the previous set or this one, never a mix."""
    os.makedirs(out_dir, exist_ok=True)
    aside = tempfile.mkdtemp(prefix=".export-", dir=out_dir)
    try:
        write(aside)
        names = sorted(os.listdir(aside))
        for name in names:
            fsync_path(os.path.join(aside, name))
        with publishing_export(out_dir):
            for name in names:
                os.replace(os.path.join(aside, name), os.path.join(out_dir, name))
            fsync_path(out_dir)
    finally:
        shutil.rmtree(aside)
