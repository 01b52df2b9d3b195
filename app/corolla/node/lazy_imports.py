"""One lock around the node's lazy imports of the engine (torch, transformers, hivemind, corolla.swarm).

An idle node imports none of them; the first request that needs one imports it, and requests run on
several threads at once (the API's thread pool, the contribution's start, chats). When two threads'
imports wait on each other's module locks, Python hands one of them a half-imported module: the window
polling /api/hardware while the user pressed Start made the start fail with "cannot import name
'PretrainedConfig' from 'transformers'". Under this lock the first imports happen one thread at a time;
later ones find the modules in sys.modules and only take the lock.
"""

from __future__ import annotations

import threading

# Re-entrant: a function that imports under the lock may call another that does.
_lock = threading.RLock()


def engine_imports() -> threading.RLock:
    """`with engine_imports(): from corolla.swarm... import ...` in any node code that runs off the main
    thread and imports the engine lazily."""
    return _lock
