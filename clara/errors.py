"""The errors a user can cause (bad settings, data or checkpoints). Each message names the setting, file or
line and what was expected; the command lines print it as one line and exit 2."""

from __future__ import annotations


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
