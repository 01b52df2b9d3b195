"""How to start another `corolla` process: from a source install or from the packaged bundle."""

from __future__ import annotations

import sys


def is_frozen() -> bool:
    """True inside the PyInstaller bundle, where sys.executable is `corolla` itself."""
    return bool(getattr(sys, "frozen", False))


def corolla_command(*args: str) -> list[str]:
    """The argv that runs `corolla ARGS...` with this same installation."""
    if is_frozen():
        return [sys.executable, *args]
    return [sys.executable, "-m", "corolla.cli", *args]
