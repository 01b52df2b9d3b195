"""Where a direct (not pushed) token step's time goes at each server of a chain, from the step traces
(corolla.swarm.steptrace) of one client and its servers on one machine.

Per chain position, the median of: `to_server` (client send -> the server's read of the message),
split where the server's stream reader hands it on into `to_reader` (send -> the stream reader has read
and decoded it) and `to_session` (-> the session takes it from its inbox), `before_compute` (read -> the
step handler starts), `compute` (handler start -> output ready),
`reply` (output -> reply handed to the stream), `to_client` (handed over -> the client's read), and
`client_between` (the client's read of this server's reply -> its send to the next server).

Usage: .venv/bin/python benchmarks/hop_trace.py DIR  (DIR: COROLLA_STEP_TRACE of the run)
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from corolla.swarm.steptrace import read_events

SERVER_EVENTS = {"input", "step_start", "computed", "replied"}  # each server's, for every step kept
LEGS = ("to_server", "to_reader", "to_session", "before_compute", "compute", "reply", "to_client", "client_between")


def hops(folder: Path) -> dict:
    by_step: dict[str, list[dict]] = defaultdict(list)
    for event in read_events(folder):
        if event.get("step"):
            by_step[event["step"]].append(event)
    legs: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for events in by_step.values():
        sends = [e for e in events if e["event"] == "client_send"]
        replies = [e for e in events if e["event"] == "client_reply"]
        if not sends or len(sends) != len(replies) or any(e.get("pushed") for e in events if e["event"] == "input"):
            continue  # replays, hedges, pushed steps: not a direct token step
        servers = defaultdict(dict)
        for event in events:
            if event["event"] in ("input", "step_start", "computed", "replied", "delivered"):
                servers[event["who"]].setdefault(event["event"], event["t"])
        chain = sorted(servers.values(), key=lambda s: s.get("step_start", 0.0))
        if len(chain) != len(sends) or any(not s.keys() >= SERVER_EVENTS for s in chain):
            continue
        for k, (send, reply, server) in enumerate(zip(sends, replies, chain, strict=True)):
            row = legs[k]
            row["to_server"].append(server["input"] - send["t"])
            if "delivered" in server:  # the stream's reader delivers straight to the session (streams.py)
                row["to_reader"].append(server["delivered"] - send["t"])
                row["to_session"].append(server["input"] - server["delivered"])
            row["before_compute"].append(server["step_start"] - server["input"])
            row["compute"].append(server["computed"] - server["step_start"])
            row["reply"].append(server["replied"] - server["computed"])
            row["to_client"].append(reply["t"] - server["replied"])
            if k + 1 < len(sends):
                row["client_between"].append(sends[k + 1]["t"] - reply["t"])
    out = {}
    for k, row in sorted(legs.items()):
        out[str(k)] = {leg: round(1000 * statistics.median(v), 3) for leg, v in row.items() if v}
        out[str(k)]["steps"] = len(row["compute"])
    return out


if __name__ == "__main__":
    print(json.dumps(hops(Path(sys.argv[1])), indent=2))
