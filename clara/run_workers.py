"""`python -m clara.run_workers`, kept for existing commands: the command is clara.training.run_workers."""

import sys

from clara.training.run_workers import main

if __name__ == "__main__":
    sys.exit(main())
