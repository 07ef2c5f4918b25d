"""Prepared data sets on disk: one folder per key, published whole, found again by every later run.

    $CLARA_DATA_CACHE (default: the Hugging Face datasets cache, HF_DATASETS_CACHE/clara_prepared)
      STAGE-KEYDIGEST/          an entry: report.json (written last), rejected.jsonl, shard-*.arrow
      STAGE-KEYDIGEST.lock      held (fcntl) by the process preparing that entry
      .STAGE-KEYDIGEST.tmp-*    an entry being written; renamed into place when complete
      jobs/                     which entry each running job's preparing process is making (see `job_pointer`)

A process that wants an entry takes its lock, and prepares it only if it is still missing once the lock is
held: two jobs never prepare the same entry at once, and a reader never sees half of one. The other ranks
of a job never read the input: they wait for the pointer and the entry to appear and memory-map it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator

import datasets

from clara.data.fingerprint import key_digest
from clara.files import fsync_path, read_json, write_json_atomic
from clara.locks import waiting_lock

REPORT = "report.json"
REJECTED = "rejected.jsonl"
POLL_S = 1.0
SAY_EVERY_S = 60.0
STALE_POINTER_S = 7 * 24 * 3600


def cache_root() -> str:
    """Where prepared data sets live: $CLARA_DATA_CACHE, else inside the Hugging Face datasets cache."""
    return os.environ.get("CLARA_DATA_CACHE") or os.path.join(datasets.config.HF_DATASETS_CACHE, "clara_prepared")


def entry_path(stage_name: str, key: dict) -> str:
    return os.path.join(cache_root(), f"{stage_name}-{key_digest(key)}")


def is_published(entry: str) -> bool:
    return os.path.isfile(os.path.join(entry, REPORT))


def read_report(entry: str) -> dict:
    return read_json(os.path.join(entry, REPORT))


def entry_lock(entry: str, log: Callable[[str], None]) -> contextlib.AbstractContextManager:
    """Hold the entry's lock (clara.locks.waiting_lock: it dies with its process, so kill -9 leaves none behind).
    Without OS locks (some NFS mounts) the entry is prepared unlocked: the rename still publishes it whole."""
    os.makedirs(os.path.dirname(entry), exist_ok=True)
    return waiting_lock(
        entry + ".lock",
        waiting=lambda holder: log(
            f"Waiting for another process that prepares the same data ({holder}) to finish: {entry}"
        ),
        unlocked=lambda error: log(
            f"Cannot lock {entry}.lock ({error.strerror}); preparing without the lock: set CLARA_DATA_CACHE "
            "to a local folder if several jobs may prepare the same data at once"
        ),
    )


@contextlib.contextmanager
def building(entry: str) -> Iterator[str]:
    """A fresh folder to write an entry into (under the entry's lock); renamed to `entry` on success."""
    parent, name = os.path.split(entry)
    for left in os.listdir(parent):  # a preparation killed earlier; the lock says none is running now
        if left.startswith(f".{name}.tmp-"):
            shutil.rmtree(os.path.join(parent, left), ignore_errors=True)
    folder = os.path.join(parent, f".{name}.tmp-{socket.gethostname()}-{os.getpid()}")
    os.makedirs(folder)
    try:
        yield folder
        for file in os.listdir(folder):
            fsync_path(os.path.join(folder, file))
        try:
            os.rename(folder, entry)
        except OSError:
            if not is_published(entry):  # published meanwhile by a process that could not take the lock either
                raise
        fsync_path(parent)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def job_pointer(dataset: str, stage_name: str, settings: dict) -> str:
    """The file through which a job's preparing process tells the job's other processes on this node which
    entry it makes. Named by the node, the torchrun agent (the parent of every local rank) and the job's
    rendezvous port, so that no other job, nor an earlier one, shares it."""
    job = f"{socket.gethostname()}-{os.getppid()}-{os.environ.get('MASTER_PORT', '')}"
    what = key_digest({"dataset": dataset, "stage": stage_name, "settings": settings})
    return os.path.join(cache_root(), "jobs", f"{job}-{what}.json")


def point_to(pointer: str, entry: str) -> None:
    folder = os.path.dirname(pointer)
    os.makedirs(folder, exist_ok=True)
    now = time.time()
    for name in os.listdir(folder):  # pointers of jobs long finished
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if now - os.path.getmtime(path) > STALE_POINTER_S:
                os.remove(path)
    write_json_atomic(pointer, {"entry": entry})


def wait_for_entry(pointer: str, who: str, log: Callable[[str], None]) -> str:
    """The entry the job's preparing process makes, once published. No timeout: preparing a few million
    records may take a while; a failure of the preparing process ends this one through torchrun."""
    started = last_said = time.monotonic()
    entry = None
    while True:
        if entry is None and os.path.isfile(pointer):
            entry = read_json(pointer)["entry"]
        if entry is not None and is_published(entry):
            return entry
        time.sleep(POLL_S)
        if time.monotonic() - last_said >= SAY_EVERY_S:
            last_said = time.monotonic()
            log(
                f"{who}: waiting for the data being prepared by local rank 0 "
                f"({time.monotonic() - started:.0f} s so far; {entry or pointer})"
            )
