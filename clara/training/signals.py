"""Stop requests: SIGTERM and SIGINT end a run at the next step boundary, after a resumable save, instead of
killing it mid-step."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class Stop(Exception):
    """A signal asked the run to stop after saving."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """SIGTERM and SIGINT are recorded, not acted on: the loop finishes its step, saves and stops."""
    received: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield received
    finally:
        # After a stop, keep ignoring the signals: torchrun sends more while the ranks exit.
        if not received:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
