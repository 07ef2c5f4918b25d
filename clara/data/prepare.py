"""One pass over the input: every row parsed, normalised, checked and written to an Arrow shard.

The sources are cut into tasks (clara.data.sources); a pool of processes (DATA_WORKERS) runs one task
at a time each, and the parent merges their reports in input order, turning task-local positions into
FILE:LINE or row indices. A task's shard holds its good records in input order, so the shards, read in
task order, are the data set. Small inputs are one task, read in the calling process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
from tqdm import tqdm

from clara.data.records import FEATURES, BadRecord, parse_row
from clara.data.sources import Task, iter_rows
from clara.stages import Stage

BATCH_ROWS = 1000  # records per Arrow record batch: a worker holds about this many at a time
# A record's problem beyond its schema (a decoder input over MAX_LEN), None when it has none.
Check = Callable[[dict], "str | None"]


@dataclass
class TaskResult:
    index: int
    positions: int  # lines (or rows) the task covered: where the next task of the same source starts counting
    good: int
    rejected: list[tuple[int, str, str]]  # (position in the task, reason, the row as text)
    shard: str
    check_error: str | None = None


@dataclass
class Prepared:
    """What a preparation found: the good records' shards and every rejected row."""

    records: int = 0
    rejected: list[tuple[str, int, str, str]] = field(default_factory=list)  # (source, line or row, reason, text)
    shards: list[str] = field(default_factory=list)
    check_error: str | None = None  # the check could not be set up (e.g. no tokenizer); schema checks still ran
    workers: int = 1
    seconds: float = 0.0


def _row_text(row: bytes | str | dict) -> str:
    if isinstance(row, bytes):
        return row.decode("utf-8", errors="replace").rstrip("\r\n")
    return row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)


def _open_check(make_check: Callable[[], Check] | None) -> tuple[Check | None, str | None]:
    """The check, built once per process (it may load a tokenizer); or why it could not be built, which the
    parent reports after the schema errors (records that break the schema need no tokenizer to be named)."""
    if make_check is None:
        return None, None
    try:
        return make_check(), None
    except Exception as error:  # noqa: BLE001 - carried to the parent and raised there (Prepared.check_error)
        return None, f"{type(error).__name__}: {error}"


def prepare_task(
    task: Task, stage: Stage, min_docs: int, make_check: Callable[[], Check] | None, folder: str
) -> TaskResult:
    """Read one task's rows, keep the good records in `folder`/shard-N.arrow and report the rest."""
    check, check_error = _open_check(make_check)
    schema = FEATURES[stage.schema].arrow_schema
    shard = os.path.join(folder, f"shard-{task.index:05d}.arrow")
    good, position, rejected, batch = 0, 0, [], []
    with pa.OSFile(shard, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for position, row in iter_rows(task):
            if row is None:
                continue
            try:
                record = parse_row(stage, row, min_docs)
                problem = check(record) if check else None
            except BadRecord as error:
                problem = str(error)
            if problem:
                rejected.append((position, problem, _row_text(row)))
                continue
            batch.append(record)
            good += 1
            if len(batch) == BATCH_ROWS:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema))
                batch = []
            if good == task.limit:
                break
        if batch:
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema))
    return TaskResult(task.index, position, good, rejected, shard, check_error)


@contextlib.contextmanager
def _results(run: Callable[[Task], TaskResult], tasks: list[Task], workers: int) -> Iterator[Iterator[TaskResult]]:
    """Each task's result, in task order: from a pool of `workers` processes, or here for one task."""
    if workers <= 1 or len(tasks) == 1:
        yield map(run, tasks)
        return
    # Forked, as PyTorch's DataLoader workers are: they start at once with the parent's modules imported
    # (a fresh interpreter spends seconds importing transformers and datasets), sharing its memory.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield pool.imap(run, tasks)


def prepare(
    tasks: list[Task],
    stage: Stage,
    min_docs: int,
    make_check: Callable[[], Check] | None,
    workers: int,
    folder: str,
    progress: bool = True,
) -> Prepared:
    """Run every task (in `workers` processes) and merge their reports in input order."""
    started = time.monotonic()
    workers = max(1, min(workers, len(tasks)))
    run = functools.partial(prepare_task, stage=stage, min_docs=min_docs, make_check=make_check, folder=folder)
    prepared = Prepared(workers=workers)
    counted: dict[str, int] = {}  # positions each source has covered so far
    bar = tqdm(
        total=sum(task.size for task in tasks),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        delay=3,
        desc=f"Preparing {tasks[0].label if tasks else ''}",
        disable=not progress,
        file=sys.stderr,
        mininterval=1,
    )
    with bar, _results(run, tasks, workers) as results:
        for task, result in zip(tasks, results):
            before = counted.get(task.label, 0)
            counted[task.label] = before + result.positions
            prepared.rejected += [
                (task.label, before + position - 1 + task.first_position, reason, text)
                for position, reason, text in result.rejected
            ]
            prepared.records += result.good
            prepared.shards.append(os.path.basename(result.shard))
            prepared.check_error = prepared.check_error or result.check_error
            bar.update(task.size)
            bar.set_postfix_str(
                f"{prepared.records:,} records, "
                f"{prepared.records / max(time.monotonic() - started, 1e-9):,.0f} records/s",
                refresh=False,
            )
            if task.limit is not None and prepared.records >= task.limit:
                break
    prepared.seconds = time.monotonic() - started
    return prepared
