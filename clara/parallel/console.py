"""What a process of a job prints: rank 0 speaks for the job, the others stay silent (standard library only, so
a command line that may run without torch, such as synthesis through a server, can use it)."""

from __future__ import annotations

from collections.abc import Callable


def silent(*args, **kwargs) -> None:
    """A log that prints nothing: the processes that do not speak for the job."""


def rank_zero_print(rank: int) -> Callable[..., None]:
    """print on rank 0, nothing elsewhere: one line per job, not one per process."""
    return print if rank == 0 else silent
