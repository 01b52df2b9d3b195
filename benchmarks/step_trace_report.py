"""Where honest token steps' time goes: joins the client's and the server's stamps that
`benchmarks/hostile_load.py --trace DIR` wrote and prints, per phase (quiet, attacked), the median
and the p99-tail means of each leg: client send -> server read, read -> compute start (queueing),
compute, compute end -> reply handed to the stream, reply -> client receive. Prints JSON.

Usage: .venv/bin/python benchmarks/step_trace_report.py DIR
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

LEGS = ("to_server", "before_compute", "compute", "after_compute", "to_client", "total")


def legs(client: dict, server: dict) -> dict:
    start, end = server["compute"]
    return {
        "to_server": server["read"] - client["sent"],
        "before_compute": start - server["read"],
        "compute": end - start,
        "after_compute": server["reply"] - end,
        "to_client": client["received"] - server["reply"],
        "total": client["received"] - client["sent"],
    }


def report(directory: Path) -> dict:
    out = {}
    for client_file in sorted(directory.glob("*/client.jsonl")):
        served = {}
        for server_file in client_file.parent.glob("*.jsonl"):  # the server's lines, by process id
            for line in server_file.read_text().splitlines():
                row = json.loads(line)
                if row.get("event") == "server_step":
                    served[(row["session"], row["step"])] = row
        phases: dict[str, list[dict]] = {}
        for line in client_file.read_text().splitlines():
            row = json.loads(line)
            match = served.get((row["session"], row["step"]))
            if match is None or row["phase"] == "warm-up":
                continue
            step = legs(row, match)
            step["queued_jobs"] = (match["queue"] or [0, 0])[1] + bool((match["queue"] or [0, 0])[0])
            step["inline"] = match["inline"]
            phases.setdefault(row["phase"], []).append(step)
        run = {}
        for phase, steps in phases.items():
            steps.sort(key=lambda s: s["total"])
            tail = steps[int(0.97 * len(steps)) :]  # the slowest 3 %: what a p99 is made of
            run[phase] = {
                "steps": len(steps),
                "median_ms": {leg: round(1000 * statistics.median(s[leg] for s in steps), 3) for leg in LEGS},
                "slowest_3pct_mean_ms": {leg: round(1000 * statistics.mean(s[leg] for s in tail), 3) for leg in LEGS},
                "slowest_3pct": [
                    {k: (round(1000 * v, 2) if isinstance(v, float) else v) for k, v in s.items()} for s in tail
                ],
                "share_inline": round(sum(s["inline"] for s in steps) / len(steps), 3),
                "share_behind_a_job": round(sum(s["queued_jobs"] > 0 for s in steps) / len(steps), 3),
            }
        out[client_file.parent.name] = run
    return out


if __name__ == "__main__":
    print(json.dumps(report(Path(sys.argv[1])), indent=2))
