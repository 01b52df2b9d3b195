"""Issue 32's speed figures in one report: loopback (client_tokens_per_second.py) and the network lab at
several one-way delays per link (wan_tokens_per_second.py, the clean variant), each against stock Petals
measured in the same run, with every target marked met or missed.

Targets: on loopback Corolla >= 3x Petals tokens/s at 1 and 3 servers and an extra hop <= 2x the raw
stream round trip (extra_hop.py: both chains and the round trip timed in the same rounds); in the lab
(3 servers), the default client (`auto`) >= 2x Petals at 0 and 5 ms per link, and at 25 ms >= 2x
Petals and within 1.1x the push floor. The 1- and 2-server chains are reported
beside them, each with the ratio a client at the floor would reach (at 25 ms and one server, Petals is
one round trip per token too: no client can be 2x there).

Usage (root; the lab needs network namespaces), about 15 minutes on a quiet 2-core machine:
    unshare -n sh -c 'ip link set lo up && PYTHONPATH=app .venv/bin/python benchmarks/speed_report.py'
Parts: --delays 25 (lab only at 25 ms), --skip-loopback, --skip-lab.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOOPBACK_RATIO, HOP_OVER_RAW, LAB_RATIO, FLOOR_RATIO = 3.0, 2.0, 2.0, 1.1


def run_json(argv: list[str]) -> dict:
    """A benchmark script's JSON report (its progress lines go to stderr, shown as they come)."""
    done = subprocess.run([sys.executable, *argv], stdout=subprocess.PIPE, text=True, check=True, timeout=3600)
    return json.loads(done.stdout)


def loopback_targets(report: dict) -> list[dict]:
    ratios = report.get("corolla_over_petals", {})
    targets = [
        {
            "figure": f"loopback, {n} server(s): Corolla / Petals tokens/s",
            "value": ratios.get(n),
            "target": f">= {LOOPBACK_RATIO}",
            "met": ratios.get(n) is not None and ratios[n] >= LOOPBACK_RATIO,
        }
        for n in ("1", "3")
    ]
    return targets


def hop_target(hop: dict) -> dict:
    """The extra hop from extra_hop.py: both chains and the raw round trip timed round by round, the
    same seconds for all three (client_tokens_per_second.py's own figure, from chains timed minutes
    apart, is reported beside it)."""
    value, limit = hop.get("extra_hop_ms"), hop.get("target_ms_per_extra_hop")
    return {
        "figure": "loopback: ms per extra hop, chains interleaved (raw stream round trip x2 as the limit)",
        "value": value,
        "target": f"<= {limit}",
        "met": value is not None and limit is not None and value <= limit,
        "rounds_within_target": f"{hop.get('rounds_within_target')} of {hop.get('rounds')}",
    }


def sequential_hop(report: dict) -> dict:
    return {
        "figure": "loopback: ms per extra hop, chains timed one after the other (client_tokens_per_second.py)",
        "value": report.get("corolla_ms_per_extra_hop"),
        "twice_the_raw_round_trip": report.get("target_ms_per_extra_hop"),
    }


def lab_targets(delay_ms: float, report: dict) -> tuple[list[dict], list[dict]]:
    """The targets (3 servers, the issue's chain) and the other chains' figures beside them. Each says
    the ratio no client could beat there: stock Petals' time per token over the push floor's."""
    targets, figures = [], []
    for servers, chain in sorted(report.get("chains", {}).items()):
        clean = chain.get("clean", {})
        auto = clean.get("corolla", {}).get("auto", {})
        ratio = auto.get("vs_stock_petals_tokens_per_s")
        stock_ms = clean.get("stock_petals", {}).get("ms_per_token")
        floor_ms = clean.get("floor", {}).get("ms_per_token")
        row = {
            "figure": f"lab {delay_ms:g} ms/link, {servers} server(s): Corolla (auto) / Petals tokens/s",
            "value": ratio,
            "at_the_floor_it_would_be": round(stock_ms / floor_ms, 2) if stock_ms and floor_ms else None,
        }
        if servers != "3":
            figures.append(row)
            continue
        targets.append(row | {"target": f">= {LAB_RATIO}", "met": ratio is not None and ratio >= LAB_RATIO})
        floor = clean.get("floor", {}).get("auto_vs_floor")
        if delay_ms >= 25:
            targets.append(
                {
                    "figure": f"lab {delay_ms:g} ms/link, 3 servers: Corolla (auto) / push floor",
                    "value": floor,
                    "target": f"<= {FLOOR_RATIO}",
                    "met": floor is not None and floor <= FLOOR_RATIO,
                }
            )
    return targets, figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delays", default="0,5,25", help="one-way delays per link in the lab (ms)")
    parser.add_argument("--skip-loopback", action="store_true")
    parser.add_argument("--skip-lab", action="store_true")
    args = parser.parse_args()
    report: dict = {"load_average_before": [round(x, 2) for x in os.getloadavg()], "targets": []}
    if not args.skip_loopback:
        report["loopback"] = run_json([str(HERE / "client_tokens_per_second.py")])
        report["targets"] += loopback_targets(report["loopback"])
        report["extra_hop"] = run_json([str(HERE / "extra_hop.py")])
        report["targets"].append(hop_target(report["extra_hop"]))
        report.setdefault("other_chains", []).append(sequential_hop(report["loopback"]))
    if not args.skip_lab:
        report["lab"] = {}
        for delay in (float(d) for d in args.delays.split(",")):
            script = str(HERE / "wan_tokens_per_second.py")
            lab = run_json([script, "--delay-ms", str(delay), "--variants", "clean", "--modes", "push,auto"])
            report["lab"][f"{delay:g}ms"] = lab
            targets, figures = lab_targets(delay, lab)
            report["targets"] += targets
            report.setdefault("other_chains", []).extend(figures)
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["met"] = sum(t["met"] for t in report["targets"])
    report["missed"] = [t["figure"] for t in report["targets"] if not t["met"]]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
