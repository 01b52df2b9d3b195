"""`python -m corolla.cli`: what the `corolla` executable runs."""

import sys

from corolla.cli.parser import main

if __name__ == "__main__":
    sys.exit(main())
