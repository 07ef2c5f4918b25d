"""The errors a user can cause (bad settings, data or checkpoints). Each message names the setting, file or
line and what was expected; the command lines print it as one line and exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


class ConfigError(ValueError):
    """A setting a user gave is invalid: `name` is the setting, `value` what was given, `expected` what would
    do. The message names the trainer flag; the launchers name the environment variable instead."""

    def __init__(self, name: str, value, expected: str):
        self.name, self.value, self.expected = name, value, expected
        super().__init__(f"--{name}={value!r}: expected {expected}")


class DataError(ValueError):
    """Bad records; the message names every bad FILE:LINE (the first 20 and a count). `reported`: another
    process of the job (the one that prepared the data) prints this message; this one need not repeat it."""

    def __init__(self, message: str, reported: bool = False):
        super().__init__(message)
        self.reported = reported


class CheckpointError(ValueError):
    """A directory is not a usable checkpoint; the message says which file or setting is wrong."""


class CorpusIndexError(ValueError):
    """A corpus index that cannot be built or used as asked."""


class ResumeError(ValueError):
    """A resumable checkpoint the user pointed at (or that SAVE_PATH holds) must not or cannot be loaded."""


class FolderBusy(RuntimeError):
    """Another run (or export, or index build) holds the folder; the message names the holder."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, CorpusIndexError, ResumeError, FolderBusy)


class RunFailure(RuntimeError):
    """The run cannot go on (disk full, diverged); the message says what was kept and what to do. Not the
    user's input: the command lines print it as one line and exit 1."""


def exit_status(body: Callable[[], int | None], quiet: bool = False, also: tuple[type[Exception], ...] = ()) -> int:
    """Run a command line's `body` and return the process's exit status, the same way for every command line:
    what `body` returns (None: 0); a user error (USER_ERRORS, and `also`) is one line on stderr and 2; a RunFailure
    one line and 1. quiet: print nothing (a rank other than 0); an error marked `reported` was printed already
    by the process that found it."""
    try:
        status = body()
    except (*USER_ERRORS, *also) as error:
        if not quiet and not getattr(error, "reported", False):
            print(f"error: {error}", file=sys.stderr)
        return 2
    except RunFailure as failure:
        if not quiet:
            print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0 if status is None else status
