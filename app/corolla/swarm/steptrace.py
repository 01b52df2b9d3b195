"""Per-step timestamps for diagnosing latency across a chain (off unless COROLLA_STEP_TRACE is set).

COROLLA_STEP_TRACE names a directory; each process appends JSON lines `{"t", "who", "event", ...}` to
its own file there. Every lab host shares the machine's wall clock, so the files of a client and its
servers merge into one timeline per `step_id` (benchmarks/wan_trace.py does that).
"""

from __future__ import annotations

import json
import os
import time

_DIR = os.environ.get("COROLLA_STEP_TRACE")
_file = None
_who = f"{os.getpid()}"


def enabled() -> bool:
    return bool(_DIR)


def set_role(who: str) -> None:
    global _who
    _who = who


def mark(event: str, **fields: object) -> None:
    """Record one event (no-op unless tracing is on)."""
    global _file
    if not _DIR:
        return
    if _file is None:
        os.makedirs(_DIR, exist_ok=True)
        _file = open(os.path.join(_DIR, f"{os.getpid()}.jsonl"), "a", buffering=1)  # noqa: SIM115
    _file.write(json.dumps({"t": time.time(), "who": _who, "event": event, **fields}) + "\n")
