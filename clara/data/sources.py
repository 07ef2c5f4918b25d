"""Where rows come from: one row iterator per source kind, and the plan that cuts the sources into tasks.

A task is a piece of input that one preparing process reads alone: a byte range of a JSON-lines file (cut
at line starts) or a list of table files of a Hub configuration. Every kind yields (position, row) pairs,
positions counted from 1 within the task, a row being bytes (a JSON line), a dict (a table row) or None
(a blank line, which only moves the position). The preparation turns positions into FILE:LINE or row
indices once the tasks before it have been counted, so tasks can run in any process, in parallel.

A new source kind is a row iterator registered in ROW_ITERATORS and a few lines in `plan_tasks`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import datasets

from clara.data.hub import JSON_LINES_SUFFIXES, TABLE_MODULES, hub_files
from clara.data.spec import DataSource, JsonlFiles
from clara.errors import DataError

# A JSON-lines file is cut into ranges of about this size, so that every worker has several to read and
# the progress bar moves; small files are one task (read in the calling process, no worker is started).
CHUNK_BYTES = 32 << 20
MAX_CHUNK_BYTES = 256 << 20


@dataclass(frozen=True)
class Task:
    """One piece of input. `label` names it in messages: the JSONL path, or hf:NAME:CONFIG:SPLIT."""

    index: int
    kind: str  # a key of ROW_ITERATORS
    label: str
    files: tuple[str, ...]
    start: int = 0  # byte range of files[0] (kind "lines")
    end: int = 0
    size: int = 0  # bytes, for the progress bar
    count_blank: bool = True  # JSONL numbers every line; a Hub split numbers its rows only
    limit: int | None = None  # stop after this many good records (a prefix of a Hub data set)

    @property
    def first_position(self) -> int:
        """What the first position is called: line 1 of a file, row 0 of a Hub split."""
        return 1 if self.count_blank else 0


def line_rows(task: Task) -> Iterator[tuple[int, bytes | None]]:
    """The lines of a byte range of a JSON-lines file; blank lines as None."""
    position = 0
    with open(task.files[0], "rb") as handle:
        handle.seek(task.start)
        offset = task.start
        for raw in handle:
            if offset >= task.end:
                break
            offset += len(raw)
            if raw.strip():
                position += 1
                yield position, raw
            elif task.count_blank:
                position += 1
                yield position, None


def table_rows(task: Task) -> Iterator[tuple[int, str | dict]]:
    """The rows of data files read through `datasets` (tables, compressed or remote JSON lines), in order."""
    position = 0
    for file in task.files:
        name = file.lower()
        if name.endswith(JSON_LINES_SUFFIXES):
            lines = datasets.load_dataset("text", data_files=[file], split="train", streaming=True)
            rows = (line["text"] for line in lines if line["text"].strip())
        else:
            suffix = os.path.splitext(name)[1]
            if suffix not in TABLE_MODULES:
                raise DataError(f"{file}: unsupported data file; expected JSON lines or " + ", ".join(TABLE_MODULES))
            table = datasets.load_dataset(TABLE_MODULES[suffix], data_files=[file], split="train", streaming=True)
            # A null in a table column means that the row lacks the field.
            rows = ({key: value for key, value in row.items() if value is not None} for row in table)
        for row in rows:
            position += 1
            yield position, row


ROW_ITERATORS = {"lines": line_rows, "table": table_rows}


def iter_rows(task: Task) -> Iterator[tuple[int, bytes | str | dict | None]]:
    return ROW_ITERATORS[task.kind](task)


def line_starts(path: str, size: int, chunk: int) -> list[int]:
    """Offsets that cut a file into ranges of about `chunk` bytes, each at the start of a line."""
    cuts = [0]
    with open(path, "rb") as handle:
        for guess in range(chunk, size, chunk):
            if guess <= cuts[-1]:
                continue
            handle.seek(guess - 1)
            handle.readline()  # to the end of the line that holds byte guess - 1
            if handle.tell() >= size:
                break
            cuts.append(handle.tell())
    return cuts + [size]


def _line_tasks(
    path: str, label: str, count_blank: bool, workers: int, first_index: int, chunk_bytes: int | None
) -> list[Task]:
    size = os.path.getsize(path)
    chunk = chunk_bytes or min(MAX_CHUNK_BYTES, max(CHUNK_BYTES, size // (16 * workers) + 1))
    cuts = line_starts(path, size, chunk)
    return [
        Task(first_index + i, "lines", label, (path,), start, end, end - start, count_blank)
        for i, (start, end) in enumerate(zip(cuts, cuts[1:]))
    ]


def _is_local_lines(file: str) -> bool:
    return os.path.isfile(file) and file.lower().endswith((".jsonl", ".json"))


def plan_tasks(
    source: DataSource, max_samples: int | None = None, workers: int = 1, chunk_bytes: int | None = None
) -> list[Task]:
    """The tasks that read `source` (JSONL files, or a Hub configuration) in order.

    A Hub split read up to max_samples good rows (a prefix, streamed from the Hub when online) is one task
    read in order; otherwise local JSON-lines files are cut into byte ranges and table files are a task each.
    """
    tasks: list[Task] = []
    if isinstance(source, JsonlFiles):
        for path in source.paths:
            tasks += _line_tasks(path, path, True, workers, len(tasks), chunk_bytes)
        return tasks
    label, files = hub_files(source, streaming=max_samples is not None)
    if max_samples is not None:
        size = sum(os.path.getsize(f) for f in files if os.path.isfile(f))
        return [Task(0, "table", label, tuple(files), size=size, count_blank=False, limit=max_samples)]
    for file in files:
        if _is_local_lines(file):
            tasks += _line_tasks(file, label, False, workers, len(tasks), chunk_bytes)
        else:
            size = os.path.getsize(file) if os.path.isfile(file) else 0
            tasks.append(Task(len(tasks), "table", label, (file,), size=size, count_blank=False))
    return tasks


def iter_lines(paths: list[str]) -> Iterator[tuple[str, int, bytes]]:
    """(file, line number, line) for every non-blank line of JSON-lines files, in order."""
    for path in paths:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    yield path, number, raw
