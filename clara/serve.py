"""`python -m clara.serve`, kept for existing commands: the command is clara.serving.__main__."""

import sys

from clara.serving.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
