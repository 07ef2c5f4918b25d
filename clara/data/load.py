"""`load_records`: a data set, prepared once (clara.data.prepare) and kept (clara.data.cache), memory-mapped.

The first run on some data prepares it; every later run with the same key (the same files, stage,
tokenizer and check settings) opens the cached entry without reading the input, and still prints the
rejected-record summary, from the entry. Within a job one process per node prepares (the caller says which:
the trainer picks local rank 0); the others wait for it and open the same entry.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

import datasets

from clara.config import default_data_workers
from clara.data import cache
from clara.data.fingerprint import data_key, source_identities
from clara.data.prepare import Check, Prepared, prepare
from clara.data.records import MAX_REPORTED_ERRORS
from clara.data.sources import plan_tasks
from clara.data.spec import DataSource, HubSource, is_hub
from clara.errors import DataError
from clara.files import write_json_atomic, write_jsonl_atomic
from clara.stages import Stage


def _messages(rejected: list) -> list[str]:
    return [
        f"{source} row {line}: {reason}" if is_hub(source) else f"{source}:{line}: {reason}"
        for source, line, reason, *_ in rejected
    ]


def _write_rejected(path: str, rejected: list) -> None:
    rows = []
    for source, line, reason, text in rejected:
        where = {"dataset": source, "row": line} if is_hub(source) else {"file": source, "line": line}
        rows.append({**where, "reason": reason, "text": text})
    write_jsonl_atomic(path, rows)


def _publish_report(folder: str, key: dict, dataset: str, prepared: Prepared) -> None:
    _write_rejected(os.path.join(folder, cache.REJECTED), prepared.rejected)
    write_json_atomic(
        os.path.join(folder, cache.REPORT),
        {
            "key": key,
            "dataset": dataset,
            "records": prepared.records,
            "rejected": len(prepared.rejected),
            "first_rejected": _messages(prepared.rejected[:MAX_REPORTED_ERRORS]),
            "shards": prepared.shards,
            "seconds": round(prepared.seconds, 3),
            "workers": prepared.workers,
        },
    )


def _prepare_into(
    folder: str,
    key: dict,
    stage: Stage,
    dataset: str,
    source: DataSource,
    bad_samples: str,
    min_docs: int,
    max_samples: int | None,
    make_check: Callable[[], Check] | None,
    workers: int,
    log,
) -> None:
    hub = isinstance(source, HubSource)
    tasks = plan_tasks(source, max_samples if hub else None, workers)
    if hub:
        dataset = tasks[0].label  # with its split: hf:NAME:CONFIG:SPLIT
    prepared = prepare(tasks, stage, min_docs, make_check, workers, folder)
    if prepared.check_error:
        if prepared.rejected and bad_samples != "skip":
            raise DataError(
                _problem(len(prepared.rejected), _messages(prepared.rejected[:MAX_REPORTED_ERRORS]), dataset, stage)
            )
        raise RuntimeError(f"the MAX_LEN check of {dataset} could not be set up: {prepared.check_error}")
    _publish_report(folder, key, dataset, prepared)
    rate = prepared.records / max(prepared.seconds, 1e-9)
    log(
        f"Prepared {dataset}: {prepared.records:,} records, {len(prepared.rejected):,} rejected, in "
        f"{prepared.seconds:.1f} s ({prepared.workers} process(es), {rate:,.0f} records/s)"
    )


def _problem(count: int, first: list[str], dataset: str, stage: Stage) -> str:
    more = count - len(first)
    tail = f"\n... and {more} more bad lines" if more > 0 else ""
    return (
        f"{count} bad record(s) in {dataset} ({stage.name}):\n" + "\n".join(first) + f"{tail}\n"
        "Fix them, or set BAD_SAMPLES=skip (--bad_samples skip) to train on the rest."
    )


def _open_entry(
    entry: str,
    stage: Stage,
    dataset: str,
    bad_samples: str,
    rejected_path: str | None,
    max_samples: int | None,
    log,
    reported: bool,
    in_memory: bool = False,
) -> datasets.Dataset:
    """The entry's records; DataError for its rejected records unless bad_samples == "skip"."""
    report = cache.read_report(entry)
    dataset = report["dataset"]  # a Hub data set with its split
    if report["rejected"]:
        if bad_samples != "skip":
            raise DataError(_problem(report["rejected"], report["first_rejected"], dataset, stage), reported=reported)
        if rejected_path:
            os.makedirs(os.path.dirname(os.path.abspath(rejected_path)), exist_ok=True)
            shutil.copyfile(os.path.join(entry, cache.REJECTED), rejected_path)
        log(
            f"Skipped {report['rejected']} bad record(s) of {dataset}"
            + (f"; written to {rejected_path}" if rejected_path else "")
        )
    if report["records"] == 0:
        raise DataError(f"{dataset}: no usable {stage.name} records", reported=reported)
    shards = [datasets.Dataset.from_file(os.path.join(entry, name), in_memory=in_memory) for name in report["shards"]]
    records = datasets.concatenate_datasets(shards) if len(shards) > 1 else shards[0]
    if max_samples is not None and max_samples < len(records):
        records = records.select(range(max_samples))
    return records


def load_records(
    stage: Stage,
    source: DataSource,
    bad_samples: str = "error",
    min_docs: int = 1,
    rejected_path: str | None = None,
    max_samples: int | None = None,
    log=print,
    make_check: Callable[[], Check] | None = None,
    *,
    key: dict | None = None,
    preparer: bool = True,
    workers: int | None = None,
) -> datasets.Dataset:
    """Validated records of `source` (JSONL files, or a Hub configuration: clara.data.spec), memory-mapped.

    make_check() returns a check for what the schema cannot see (a decoder input over MAX_LEN); it is
    built once in each preparing process, and its `key()` (tokenizer and settings) joins the cache key.
    `key` replaces the computed cache key (the trainer passes clara.data.fingerprint.train_data_key).
    preparer False: wait for the process of this node that prepares the data (never read the input).
    Raises DataError naming the bad lines (the first 20 and a count), unless bad_samples == "skip", in which
    case the bad lines are written to rejected_path and the good ones are loaded.
    """
    dataset = str(source)  # as the setting names it, in messages
    settings = {"min_docs": min_docs, "max_samples": max_samples}
    args = (stage, dataset, bad_samples, rejected_path, max_samples, log)
    if not preparer:
        pointer = cache.job_pointer(dataset, stage.name, settings)
        return _open_entry(
            cache.wait_for_entry(pointer, f"rank {os.environ.get('RANK', '?')}", log), *args, reported=True
        )
    if key is None and make_check is not None and not hasattr(make_check, "key"):
        return _load_uncached(
            stage, dataset, source, bad_samples, min_docs, rejected_path, max_samples, log, make_check
        )
    if key is None:
        check_key = make_check.key() if make_check is not None else None
        hub_prefix = max_samples if isinstance(source, HubSource) else None  # JSONL: all prepared, a prefix kept
        key = data_key(
            source_identities(source, hub_prefix is not None),
            stage.name,
            check_key,
            {"min_docs": min_docs, "max_samples": hub_prefix},
        )
    entry = cache.entry_path(stage.name, key)
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        cache.point_to(cache.job_pointer(dataset, stage.name, settings), entry)
    if cache.is_published(entry):
        log(f"Data: {dataset} from the cache, {entry} (prepared before: the input is not read again)")
    else:
        with cache.entry_lock(entry, log):
            if not cache.is_published(entry):
                with cache.building(entry) as folder:
                    _prepare_into(
                        folder,
                        key,
                        stage,
                        dataset,
                        source,
                        bad_samples,
                        min_docs,
                        max_samples,
                        make_check,
                        workers or default_data_workers(),
                        log,
                    )
    return _open_entry(entry, *args, reported=False)


def _load_uncached(
    stage: Stage,
    dataset: str,
    source: DataSource,
    bad_samples: str,
    min_docs: int,
    rejected_path: str | None,
    max_samples: int | None,
    log,
    make_check: Callable[[], Check],
) -> datasets.Dataset:
    """A check without a key cannot be part of a cache key: prepare in a scratch folder and load into memory."""
    root = cache.cache_root()
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".uncached-") as folder:
        _prepare_into(folder, {}, stage, dataset, source, bad_samples, min_docs, max_samples, make_check, 1, log)
        return _open_entry(
            folder, stage, dataset, bad_samples, rejected_path, max_samples, log, reported=False, in_memory=True
        )
