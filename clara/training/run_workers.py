"""`python -m clara.run_workers TORCHRUN_ARGS...`: torchrun that ends with its first failed worker's exit status.

torchrun itself exits 1 whatever its workers returned, and reports a failed worker with a traceback of its
own (ChildFailedError) and a "Root Cause" block. A worker that stops on a user error (bad records or
settings: exit 2) has printed its reason already, as FILE:LINE lines or one line naming the setting; this
runner returns that 2 to the launcher and adds nothing. Any other failure is reported as torchrun words it
(which rank, its exit code, its error), without the agent's own traceback, and its status is returned
(128 + N for a worker killed by signal N).
"""

from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

USER_ERROR = 2
# Logs "Sending process N closing signal" and "failed (exitcode: N) local_rank: R": said by main() instead.
AGENT_LOGGER = "torch.distributed.elastic.multiprocessing.api"


def worker_status(error: ChildFailedError) -> int:
    """The exit status of the worker that failed first, as a shell reports it."""
    _, failure = error.get_first_failure()
    code = failure.exitcode
    if code < 0:
        return 128 - code
    return code if 0 < code < 256 else 1


def main(argv: list[str] | None = None) -> int:
    logging.getLogger(AGENT_LOGGER).setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as error:
        status = worker_status(error)
        if status != USER_ERROR:
            print(error.format_msg(), file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
