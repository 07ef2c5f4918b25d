"""`python -m clara.ask`, kept for existing commands: the command is clara.index.ask."""

import sys

from clara.index.ask import main

if __name__ == "__main__":
    sys.exit(main())
