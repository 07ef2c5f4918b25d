"""`python -m clara.launch`, kept for existing commands: the command is clara.training.launch."""

import sys

from clara.training.launch import main

if __name__ == "__main__":
    sys.exit(main())
