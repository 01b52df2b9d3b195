"""An optional per-step timing trace for finding where a token step's latency goes (off by default).

With COROLLA_STEP_TRACE=<path> in the environment, each inference step appends one JSON line with
its session and step id and time.perf_counter() stamps (CLOCK_MONOTONIC on Linux: comparable across
the processes of one machine) at: the request read, compute start and end, and the reply handed to
the stream; plus whether it ran inline and how many compute jobs were running or waiting then.
Used by benchmarks/hostile_load.py --trace; never on in production.
"""

from __future__ import annotations

import json
import os
import time

ENV = "COROLLA_STEP_TRACE"
_lines: list[str] = []


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def now() -> float:
    return time.perf_counter()


def record(**fields: object) -> None:
    """Buffer one step's stamps; written out in batches so the trace costs the step almost nothing."""
    if not enabled():
        return
    _lines.append(json.dumps(fields))
    if len(_lines) >= 64:
        flush()


def flush() -> None:
    path = os.environ.get(ENV)
    if not path or not _lines:
        _lines.clear()
        return
    with open(path, "a") as out:
        out.write("\n".join(_lines) + "\n")
    _lines.clear()
