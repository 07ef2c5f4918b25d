"""One writer per folder (README: "Runs you cannot lose"): a training run holds its SAVE_PATH, and
`clara.model.export` / `clara.index` hold the folder they write, for their whole life.

The lock is an OS lock (flock) on `FOLDER/.lock`: it dies with the processes that hold it, so a `kill -9`
never leaves a stale lock. The launchers open that file, take the lock here (`python -m clara.locks`) on
the descriptor they keep open, and torchrun inherits it. Where the filesystem refuses OS locks (some NFS
or Lustre mounts), or CLARA_LOCK=file asks for it, the lock is the file `FOLDER/.lock.held` instead,
created only if absent, holding host, pid and start time, its modification time a heartbeat: a holder
whose heartbeat stopped STALE_AFTER_S ago, or whose pid is gone from this host, counts as gone.

Both files hold the holder as JSON (host, pid, started, run id), so that a refused launch names it.
This module is light (no torch): the launchers call it before anything loads.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from clara.errors import FolderBusy, exit_status

LOCK_NAME = ".lock"
FALLBACK_NAME = ".lock.held"
HEARTBEAT_S = 10
STALE_AFTER_S = 60
# What this module writes into a folder; anything that lists a folder's contents leaves them out.
EXPORT_LOCK_NAME = ".export.lock"
LOCK_FILES = (LOCK_NAME, FALLBACK_NAME, EXPORT_LOCK_NAME)
# CLARA_LOCK=file: the lock file even where OS locks work; auto (default): the OS lock where it works.
MODE_ENV = "CLARA_LOCK"
# Set for the processes of a launched run: where the holder's JSON is (the trainer adds its run id).
INFO_ENV = "CLARA_LOCK_INFO"
# flock's answers on a filesystem without OS locks.
NO_OS_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@dataclass
class FolderLock:
    folder: str
    mode: str  # "os" or "file"
    info_path: str
    token: str
    fd: int | None = None  # the OS lock's descriptor, when this process opened it

    def describe(self) -> str:
        """The line saying which lock is in use."""
        if self.mode == "os":
            return f"Lock on {self.folder}: an OS lock (flock) on {self.info_path}; it ends with this run's processes"
        return (
            f"Lock on {self.folder}: the lock file {self.info_path} (host, pid, a heartbeat every {HEARTBEAT_S} s; "
            f"{'CLARA_LOCK=file' if forced_file_mode() else 'this filesystem refuses OS locks'}); a holder "
            f"silent for {STALE_AFTER_S} s counts as gone"
        )

    def release(self) -> None:
        if self.mode == "file" and _read_info(self.info_path).get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.info_path)
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor ends the OS lock
            self.fd = None


def forced_file_mode() -> bool:
    return os.environ.get(MODE_ENV, "auto").strip().lower() == "file"


def _read_info(path: str) -> dict:
    """The holder's JSON; {} when absent, or torn by a write in progress after a few tries."""
    for _ in range(5):
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return {}
        except ValueError:
            time.sleep(0.05)
    return {}


def _write_info(fd: int, info: dict) -> None:
    """In place: the OS lock belongs to this very file, which must not be replaced."""
    data = json.dumps(info).encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def record_run_id(run_id: str) -> None:
    """Add the run id to the holder's JSON of the run this process belongs to (no-op outside a locked run)."""
    path = os.environ.get(INFO_ENV)
    if not path:
        return
    info = _read_info(path)
    if not info:
        return
    fd = os.open(path, os.O_WRONLY)
    try:
        _write_info(fd, {**info, "run_id": run_id})
    finally:
        os.close(fd)


def holder_line(folder: str, info: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])) if info.get("started") else "?"
    return (
        f"{folder} is in use by another run: host {info.get('host', '?')}, pid {info.get('pid', '?')} "
        f"({info.get('what', '?')}), started {started}, run id {info.get('run_id') or '(not decided yet)'}. "
        "Wait for it to end or stop it, or choose another folder"
    )


def _holder(what: str, pid: int, mode: str, token: str) -> dict:
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "what": what,
        "started": time.time(),
        "run_id": None,
        "lock": mode,
        "token": token,
    }


def take(folder: str, what: str, fd: int | None = None, pid: int | None = None) -> FolderLock:
    """Lock `folder` (created) for `what`, run by process `pid`; raises FolderBusy naming the holder.

    fd: a descriptor of FOLDER/.lock that the caller keeps open (a launcher): the OS lock is taken on it and
    outlives this process. Without fd this process opens the file and holds the lock while it lives.
    """
    os.makedirs(folder, exist_ok=True)
    token = uuid.uuid4().hex
    pid = pid or os.getpid()
    if not forced_file_mode():
        path = os.path.abspath(os.path.join(folder, LOCK_NAME))
        own = fd is None
        if own:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if own:
                os.close(fd)
            raise FolderBusy(holder_line(folder, _read_info(path))) from None
        except OSError as error:
            if own:
                os.close(fd)
            if error.errno not in NO_OS_LOCKS:
                raise
        else:
            _write_info(fd, _holder(what, pid, "os", token))
            return FolderLock(folder, "os", path, token, fd if own else None)
    return _take_file(folder, what, pid, token)


def _take_file(folder: str, what: str, pid: int, token: str) -> FolderLock:
    path = os.path.abspath(os.path.join(folder, FALLBACK_NAME))
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = _read_info(path)
            if not _gone(path, info):
                raise FolderBusy(holder_line(folder, info)) from None
            # Renamed aside first: of two launches that found it stale, one takes it over.
            with contextlib.suppress(FileNotFoundError):
                aside = f"{path}.stale-{uuid.uuid4().hex[:8]}"
                os.rename(path, aside)
                os.remove(aside)
            continue
        try:
            _write_info(fd, _holder(what, pid, "file", token))
        finally:
            os.close(fd)
        return FolderLock(folder, "file", path, token)
    raise FolderBusy(holder_line(folder, _read_info(path)))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _gone(path: str, info: dict) -> bool:
    """The lock file's holder has stopped: no heartbeat for STALE_AFTER_S, or its pid is gone from this host."""
    try:
        silent = time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return True
    if silent > STALE_AFTER_S:
        return True
    same_host = info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int)
    return same_host and not _pid_alive(info["pid"])


def heartbeat(path: str, token: str, alive, stop: threading.Event | None = None) -> None:
    """Touch the lock file every HEARTBEAT_S while `alive()` and the file is still ours; then remove it."""
    last = 0.0
    while alive() and not (stop and stop.is_set()):
        if _read_info(path).get("token") != token:
            return  # taken over (after a long stall) or removed: not ours to touch
        if time.monotonic() - last >= HEARTBEAT_S:
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)
            last = time.monotonic()
        time.sleep(0.5)
    if _read_info(path).get("token") == token:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def holding(folder: str, what: str) -> Iterator[FolderLock]:
    """This process holds `folder` while inside (a lock file gets a heartbeat thread). A folder created here
    that holds nothing but the lock at the end (the command failed) is removed again."""
    created = not os.path.isdir(folder)
    lock = take(folder, what)
    stop = threading.Event()
    beat = None
    if lock.mode == "file":
        beat = threading.Thread(
            target=heartbeat, args=(lock.info_path, lock.token, lambda: True, stop), name="lock heartbeat", daemon=True
        )
        beat.start()
    previous = os.environ.get(INFO_ENV)
    os.environ[INFO_ENV] = lock.info_path
    try:
        yield lock
    finally:
        stop.set()
        if beat is not None:
            beat.join()
        lock.release()
        if created and set(os.listdir(folder)) <= set(LOCK_FILES):
            for name in os.listdir(folder):
                os.remove(os.path.join(folder, name))
            os.rmdir(folder)
        if previous is None:
            os.environ.pop(INFO_ENV, None)
        else:
            os.environ[INFO_ENV] = previous


# -- a lock to wait for ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def waiting_lock(path: str, waiting: Callable[[str], None], unlocked: Callable[[OSError], None]) -> Iterator[None]:
    """Hold the OS lock on the file `path` (created if absent), which names this holder (host, pid) while held.

    Another holder: `waiting` is told its line, then this process waits for it. A filesystem that refuses the
    lock: `unlocked` is told why and the body runs without it (the caller must then be safe without)."""
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            waiting(handle.read().strip() or "unknown")
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:
            unlocked(error)
        handle.seek(0)
        handle.truncate()
        handle.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
        handle.flush()
        yield  # closing the file releases the lock


# -- exports: readers never see half of one -----------------------------------------------------------------
# Held exclusively while an export's files are moved into place (milliseconds), shared while a model is read.


@contextlib.contextmanager
def _export_lock(folder: str, exclusive: bool) -> Iterator[None]:
    path = os.path.join(folder, EXPORT_LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT if exclusive else os.O_RDONLY, 0o644)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        # Nothing was ever published with the lock here (an older export, the Hub cache): nothing to wait for.
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            except OSError as error:
                if error.errno not in NO_OS_LOCKS:
                    raise
        yield
    finally:
        if fd is not None:
            os.close(fd)


def reading_export(folder: str) -> contextlib.AbstractContextManager:
    """Hold while reading a model's files from `folder`: a publish waits until the read is done."""
    return _export_lock(folder, exclusive=False)


def publishing_export(folder: str) -> contextlib.AbstractContextManager:
    """Hold while moving an export's files into `folder`: readers wait until all of them are in place."""
    return _export_lock(folder, exclusive=True)


def _launcher_heartbeat(lock: FolderLock, pid: int) -> None:
    """A lock file outlives this call: a detached process keeps its heartbeat while the launcher `pid` lives."""
    subprocess.Popen(
        [sys.executable, "-m", "clara.locks", "--heartbeat", lock.info_path, "--token", lock.token, "--pid", str(pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clara.locks", description="Take a launcher's lock on its SAVE_PATH (see clara/locks.py)."
    )
    parser.add_argument("--folder", help="the folder to lock")
    parser.add_argument("--fd", type=int, help="the launcher's open descriptor of FOLDER/.lock")
    parser.add_argument("--pid", type=int, required=True, help="the launcher's pid, named to a refused launch")
    parser.add_argument("--what", default="launcher", help="what holds it, named to a refused launch")
    parser.add_argument("--heartbeat", metavar="PATH", help="(internal) keep PATH's heartbeat while --pid lives")
    parser.add_argument("--token", help="(internal) the lock file's token")
    args = parser.parse_args(argv)
    if args.heartbeat:
        heartbeat(args.heartbeat, args.token, lambda: _pid_alive(args.pid))
        return 0
    return exit_status(lambda: lock_for_launcher(args))


def lock_for_launcher(args: argparse.Namespace) -> None:
    """Take the lock (FolderBusy when another run holds it) and print what the launcher exports."""
    lock = take(args.folder, args.what, fd=args.fd, pid=args.pid)
    if lock.mode == "file":
        _launcher_heartbeat(lock, args.pid)
    print(f"CLARA_LOCK_INFO={shlex.quote(lock.info_path)}")
    print(f"CLARA_LOCK_LINE={shlex.quote(lock.describe())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
