"""Reads the step traces (corolla.swarm.steptrace) of one benchmark client run and its servers.

All lab hosts share the machine's wall clock, so the client's and the servers' events of one step
(same `step_id`) line up. What comes out is what the network floor needs from "compute measured in
the run" and the measured steady time per token:
- `server_compute_ms`: per chain position, the median time from a step's start to its output;
- `client_gap_ms`: the median time from the last server's reply to the client's next send (the
  client's own work between tokens: final norm, lm_head, choosing the token, the next embedding);
- `steady_ms_per_token`: the median time between the first sends of consecutive steps (one token
  each without speculation): the per-token time once a generation runs, without the session's
  opening and closing;
- `push_wire_ms`: per chain position, the median time from the previous server handing its push
  over to this server's push handler having it (None for the first server), and `pushes_on_stream`,
  the share of those pushes sent on a push stream (server/push_stream.py) rather than by rpc_push,
  and `pushes_direct`, the share sent on a direct link (direct_link.py) rather than through p2pd.
"""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict
from pathlib import Path

from corolla.swarm.steptrace import read_events


def _moderead_events(events: list[dict], mode: str) -> list[dict]:
    """The client's events between its `mode` marker and the next marker (benchmarks/wan_client.py)."""
    inside, kept = False, []
    for event in events:
        if event["event"] == "mode":
            inside = event.get("name") == mode
        elif inside and event["event"] in ("client_send", "client_reply"):
            kept.append(event)
    return kept


def summarize(client_dir: Path, server_dir: Path, mode: str = "push") -> dict:
    client = _moderead_events(read_events(client_dir), mode)
    steps = {e["step"] for e in client}
    by_step: dict[str, list[dict]] = defaultdict(list)
    for event in read_events(server_dir):
        if event.get("step") in steps:
            by_step[event["step"]].append(event)
    pushed = {step for step, events in by_step.items() if any(e["event"] == "push_received" for e in events)}

    # Chain position of each server, from the order the client sends to them.
    order: list[str] = []
    for event in client:
        if event["event"] == "client_send" and event["server"] not in order:
            order.append(event["server"])
    compute: dict[str, list[float]] = defaultdict(list)
    for events in by_step.values():
        started = {}
        for event in events:
            if event["event"] == "step_start":
                started[event["who"]] = event["t"]
            elif event["event"] == "computed" and event["who"] in started:
                compute[event["who"][-6:]].append(1000 * (event["t"] - started.pop(event["who"])))

    # A pushed hop's wire leg: the sender hands the push over -> the receiver's push handler has it.
    wire: dict[str, list[float]] = defaultdict(list)
    on_stream, direct = [], []
    for events in by_step.values():
        sent = None
        for event in events:
            if event["event"] == "push_send":
                sent = event  # one per push; `via` says how it went
            elif event["event"] == "push_received" and sent is not None and sent["who"] != event["who"]:
                wire[event["who"][-6:]].append(1000 * (event["t"] - sent["t"]))
                on_stream.append(sent.get("via") in ("stream", "direct"))
                direct.append(sent.get("via") == "direct")
                sent = None

    gaps, firsts = [], []
    for before, after in itertools.pairwise(client):
        if before["event"] == "client_reply" and after["event"] == "client_send" and before["step"] != after["step"]:
            gaps.append(1000 * (after["t"] - before["t"]))
    seen = set()
    for event in client:
        if event["event"] == "client_send" and event["step"] not in seen:
            seen.add(event["step"])
            firsts.append((event["step"], event["t"]))
    # The median skips the few intervals that span a generation's end and the next one's start.
    steady = [1000 * (t2 - t1) for (_, t1), (_, t2) in itertools.pairwise(firsts)]
    server_compute = [round(statistics.median(compute[s]), 2) if compute.get(s) else None for s in order]
    return {
        "server_compute_ms": server_compute,
        "client_gap_ms": round(statistics.median(gaps), 2) if gaps else None,
        "steady_ms_per_token": round(statistics.median(steady), 1) if steady else None,
        "pushed_steps": len(pushed),
        "push_wire_ms": [round(statistics.median(wire[s]), 2) if wire.get(s) else None for s in order],
        "pushes_on_stream": round(sum(on_stream) / len(on_stream), 2) if on_stream else None,
        "pushes_direct": round(sum(direct) / len(direct), 2) if direct else None,
    }
