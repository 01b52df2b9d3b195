"""Memory of Corolla's long-running processes (the node and the block server), set up at their start.

- The C allocator's arenas, capped: glibc gives each thread that allocates its own arena (up to 8 per
  core) and keeps what was freed in it; the block server's compute thread, its DHT thread and the event
  loops' executors each grew one, and measured with SmolLM2 (benchmarks/footprint.py) two arenas hold
  the server ~80 MB smaller with the same chat speed. Elsewhere (macOS, musl, Windows) this does nothing.
- What was freed, given back: glibc keeps freed memory inside its heaps (the model loading's transient
  buffers, a tokenizer's build-up, a chat's steps) until `malloc_trim`. Done every 10 s on a thread, it
  took 17 MB off the server and 11 MB off the node after a SmolLM2 chat; one trim takes 1-16 ms.
- hivemind imported without its package `__init__`: that imports the averager, the mixture-of-experts
  server and the optimizer, none of which Corolla uses (with the trimming, 19-24 MB less in the server
  and 6-8 MB in the node while a SmolLM2 chat streams; transformers still imports scipy for itself).
  Corolla imports only hivemind's submodules (p2p, dht, utils, proto, compression); anything that asks
  the package itself for a name still gets the full `__init__`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import os
import sys
import threading
import time

M_ARENA_MAX = -8  # glibc's mallopt parameter
ARENAS = 2
TRIM_EVERY_S = 10.0


def cap_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap the arenas for threads that start allocating from now on; True where the allocator took it.
    A user's MALLOC_ARENA_MAX wins (glibc read it at start)."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    return False


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError, AttributeError, TypeError):
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return None


def trim_malloc() -> bool:
    """Give the pages glibc holds free back to the system; True where glibc did (or had none to give)."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


def start_trimming(every_s: float = TRIM_EVERY_S) -> threading.Thread | None:
    """A daemon thread trimming every `every_s` seconds for the life of the process; None where the
    allocator has no malloc_trim (not glibc)."""
    if not trim_malloc():
        return None

    def trim_forever() -> None:
        while True:
            time.sleep(every_s)
            trim_malloc()

    thread = threading.Thread(target=trim_forever, name="corolla-malloc-trim", daemon=True)
    thread.start()
    return thread


def import_hivemind_lightly() -> bool:
    """Make `import hivemind.<submodule>` skip hivemind's package `__init__` (module docstring: why); True
    where it did. Call before anything imports hivemind; once hivemind is imported this does nothing."""
    if "hivemind" in sys.modules:
        return False
    spec = importlib.util.find_spec("hivemind")
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return False
    package = importlib.util.module_from_spec(spec)
    lock = threading.RLock()
    state = {"loaded": False}

    def full_package(name: str) -> object:
        # Introspection asks modules for dunders (inspect.unwrap's `__wrapped__`, which PySide's import
        # hook runs on every module imported after Qt, as in the frozen app): loading the full __init__
        # for it, in the middle of importing hivemind.p2p, was a circular import. Only __version__ is
        # one of the package's own names.
        if name.startswith("__") and name != "__version__":
            raise AttributeError(f"module 'hivemind' has no attribute {name!r}")
        # `from hivemind import dht` asks the package for a submodule: import just that one.
        if not name.startswith("__") and importlib.util.find_spec(f"hivemind.{name}") is not None:
            return importlib.import_module(f"hivemind.{name}")
        # A name the package itself exports (`from hivemind import DHT`, `hivemind.get_logger`):
        # run the real __init__ once, in this same module object, and answer from it.
        with lock:
            if not state["loaded"]:
                state["loaded"] = True
                spec.loader.exec_module(package)
        if name in package.__dict__:
            return package.__dict__[name]
        raise AttributeError(f"module 'hivemind' has no attribute {name!r}")

    package.__getattr__ = full_package
    sys.modules["hivemind"] = package
    return True
