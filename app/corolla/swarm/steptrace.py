"""Per-step timestamps for diagnosing latency (off unless COROLLA_STEP_TRACE is set; never in production).

COROLLA_STEP_TRACE names a directory; each process appends JSON lines `{"t", "who", "event", ...}` to
its own file there. Every stamp is on the wall clock, which all processes (and every lab host) of one
machine share, so the files of a client and its servers merge into one timeline per step:
benchmarks/wan_trace.py follows a step along a chain, benchmarks/step_trace_report.py splits an honest
step's latency under attack (benchmarks/hostile_load.py --trace) into its legs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TextIO

ENV = "COROLLA_STEP_TRACE"
_directory = os.environ.get(ENV)  # read once: marks sit on every step's path
_files: dict[str, TextIO] = {}
_who = f"{os.getpid()}"


def enabled() -> bool:
    return bool(_directory)


def set_directory(directory: str | None) -> None:
    """Trace into `directory` from now on (None: off); processes started later take COROLLA_STEP_TRACE."""
    global _directory
    _directory = directory


def now() -> float:
    """The trace's clock, for stamps passed as fields."""
    return time.time()


def set_role(who: str) -> None:
    global _who
    _who = who


def mark(event: str, **fields: object) -> None:
    """Record one event (no-op unless tracing is on)."""
    directory = _directory
    if not directory:
        return
    out = _files.get(directory)
    if out is None:
        os.makedirs(directory, exist_ok=True)
        out = _files[directory] = open(os.path.join(directory, f"{os.getpid()}.jsonl"), "a", buffering=1)  # noqa: SIM115
    out.write(json.dumps({"t": time.time(), "who": _who, "event": event, **fields}) + "\n")


def read_events(directory: str | os.PathLike) -> list[dict]:
    """Every process's events in `directory`, merged into one timeline (sorted by `t`). A line cut short
    by a killed process is skipped."""
    events = []
    for path in Path(directory).glob("*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return sorted(events, key=lambda e: e["t"])
