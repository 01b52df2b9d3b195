"""Where a pushed hop's time goes, from the step traces (corolla.swarm.steptrace) of one client run and
its servers on one machine (benchmarks/wan_tokens_per_second.py keeps them in its work folder).

Per receiving server, the median of: `send` (the sender's output ready -> its push handed to the
transport), `wire` (handed over -> the receiver's push handler has it: p2pd, the network and, for
rpc_push, a new libp2p stream per step), `inbox` (-> the session's loop takes it), `hop` (the sender's
output ready -> the receiver's output ready, its compute included) and, beside them, `client_leg` (the
client's own copy of the step: its send -> the receiver reads it, on the client's long-lived stream).
`via_stream`: the share of pushes written on a push stream (server/push_stream.py), on p2pd or a
direct link (direct_link.py).

Usage: .venv/bin/python benchmarks/push_hop_trace.py SERVERS_TRACE_DIR [CLIENT_TRACE_DIR]
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from corolla.swarm.steptrace import read_events


def pushed_hops(servers: Path, client: Path | None = None) -> dict:
    events = read_events(servers) + (read_events(client) if client else [])
    events.sort(key=lambda e: e["t"])
    last_computed: dict[str, str] = {}
    sends: dict[str, list[tuple[str, float, bool]]] = defaultdict(list)  # step -> (sender, t, via stream)
    marks: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)  # (step, server) -> event -> t
    client_sends: dict[tuple[str, str], float] = {}
    for event in events:
        who, name, step = event["who"], event["event"], event.get("step")
        if name == "computed":
            last_computed[who] = step
        elif name == "push_send":
            sends[step or last_computed.get(who)].append((who, event["t"], event.get("via") in ("stream", "direct")))
        elif name == "client_send" and step:
            client_sends.setdefault((step, event.get("server")), event["t"])
        if step and name in ("computed", "push_received", "input"):
            key = "input_pushed" if name == "input" and event.get("pushed") else name
            marks[(step, who)].setdefault(key, event["t"])
    legs: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (step, who), seen in marks.items():
        server = who[-6:]
        if (step, server) in client_sends and "input" in seen:
            legs[server]["client_leg"].append(seen["input"] - client_sends[(step, server)])
        if "push_received" not in seen:
            continue
        before = [s for s in sends.get(step, []) if s[1] <= seen["push_received"] and s[0] != who]
        if not before:
            continue
        sender, sent, via_stream = before[-1]
        ready = marks[(step, sender)].get("computed")
        legs[server]["via_stream"].append(1.0 if via_stream else 0.0)
        legs[server]["wire"].append(seen["push_received"] - sent)
        if ready is not None:
            legs[server]["send"].append(sent - ready)
            if "computed" in seen:
                legs[server]["hop"].append(seen["computed"] - ready)
        if "input_pushed" in seen:
            legs[server]["inbox"].append(seen["input_pushed"] - seen["push_received"])
    report = {}
    for server, named in legs.items():
        report[server] = {
            name: round(statistics.mean(values), 2)
            if name == "via_stream"
            else round(statistics.median(values) * 1000, 3)
            for name, values in named.items()
        }
        report[server]["steps"] = len(named.get("wire", []))
    return report


def main() -> None:
    client = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    print(json.dumps(pushed_hops(Path(sys.argv[1]), client), indent=1))


if __name__ == "__main__":
    main()
