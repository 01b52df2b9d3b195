"""`python -m corolla`: the same as the `corolla` command."""

import sys

from corolla.cli import main

if __name__ == "__main__":
    sys.exit(main())
