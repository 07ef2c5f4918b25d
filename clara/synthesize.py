"""`python -m clara.synthesize`, kept for existing commands: the command is clara.synthesis.__main__."""

import sys

from clara.synthesis.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
