"""`python -m clara.export`, kept for existing commands: the command is clara.model.export."""

import sys

from clara.model.export import main

if __name__ == "__main__":
    sys.exit(main())
