"""What a token step costs the client to keep its span's history (every input a server received, for
failover replays and spot checks), as a session grows: appending to a buffer that doubles
(streams.ServerStream.remember, today) against a torch.cat of the whole history per step (before).

A Llama-3-8B-shaped hidden state (4096 floats) and SmolLM2's (576), batch 1, float32; the per-step time
is measured over the steps from each length to the next, both ways in the same run. Prints JSON.

Usage: PYTHONPATH=app .venv/bin/python benchmarks/client_history.py
"""

from __future__ import annotations

import json
import os
import time

import torch

from corolla.swarm.client.routing import RouteSegment
from corolla.swarm.client.streams import ServerStream

MARKS = (256, 1024, 2048, 4096)


def per_step_us(hidden: int, appending: bool) -> dict[int, float]:
    stream = ServerStream(RouteSegment("peer", 0, 1), "bench", max(MARKS))
    history = None
    times, position, began = {}, 0, time.perf_counter()
    step = torch.randn(1, 1, hidden)
    for mark in MARKS:
        while position < mark:
            if appending:
                stream.remember(step)
            else:
                history = step if history is None else torch.cat([history, step], 1)
            position += 1
        now = time.perf_counter()
        times[mark] = round(1e6 * (now - began) / (mark - (MARKS[MARKS.index(mark) - 1] if mark != MARKS[0] else 0)), 1)
        began = now
    return times


def main() -> None:
    results = {}
    for name, hidden in (("llama-3-8b (4096)", 4096), ("smollm2 (576)", 576)):
        before, after = per_step_us(hidden, appending=False), per_step_us(hidden, appending=True)
        results[name] = {
            f"steps to {mark}": {
                "cat_us": before[mark],
                "buffer_us": after[mark],
                "speedup": round(before[mark] / max(after[mark], 0.01), 1),
            }
            for mark in MARKS
        }
    print(json.dumps({"load_average": [round(x, 2) for x in os.getloadavg()], "per_step": results}, indent=2))


if __name__ == "__main__":
    main()
