"""The C allocator's arenas, capped for Corolla's long-running processes (the node and the block server).

glibc gives each thread that allocates its own arena (up to 8 per core) and keeps what was freed in
it; the block server's compute thread, its DHT thread and the event loops' executors each grew one,
and measured with SmolLM2 (benchmarks/footprint.py) two arenas hold the server ~80 MB smaller with the
same chat speed. Elsewhere (macOS, musl, Windows) this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys

M_ARENA_MAX = -8  # glibc's mallopt parameter
ARENAS = 2


def cap_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap the arenas for threads that start allocating from now on; True where the allocator took it.
    A user's MALLOC_ARENA_MAX wins (glibc read it at start)."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    return False
