"""`python -m clara.benchmark`, kept for existing commands: the command is clara.evaluation.benchmark."""

import sys

from clara.evaluation.benchmark import main

if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())
