"""Entry point of the packaged bundle: one `corolla` executable for the window, the node and the
block server. With no arguments (a double-click) it opens the window."""

import multiprocessing

# First thing: a frozen child started by multiprocessing must run its target, not this program.
multiprocessing.freeze_support()

import sys  # noqa: E402

from corolla.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["app"]))
