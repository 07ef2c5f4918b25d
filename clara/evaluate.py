"""`python -m clara.evaluate`, kept for existing commands: the command is clara.evaluation.command."""

import sys

from clara.evaluation.command import main

if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())
