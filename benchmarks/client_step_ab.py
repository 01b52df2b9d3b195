"""This checkout against another (e.g. main) on the client_tokens_per_second.py generation: 64 greedy tokens
of the tiny Llama through 1, 2 and 3 loopback servers, the two alternating per chain and round so that load
on the shared machine hits both alike (client and servers run the code of the checkout measured). Prints
JSON: median tokens/s per chain, ms per extra hop ((ms/token at 3 - at 1) / 2), load averages.

Usage (a loopback-only namespace; COROLLA_PETALSREF_SRC as for client_tokens_per_second.py):
    unshare -n sh -c 'ip link set lo up && .venv/bin/python benchmarks/client_step_ab.py --baseline /work/main/app'
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHAINS = {1: ["0:4"], 2: ["0:2", "2:4"], 3: ["0:2", "2:3", "3:4"]}
PREFIX = "bench-llama-hf"


def worker(servers: int, new_tokens: int, runs: int) -> None:
    import torch

    import corolla
    from corolla.testing.swarm import make_reference_model, start_chain

    prompt = torch.tensor([[1, 384, 456]])
    with tempfile.TemporaryDirectory() as tmp:
        model = make_reference_model(Path(tmp) / "model", PREFIX)
        chain = start_chain(Path(tmp), model, CHAINS[servers], name=f"ab-{servers}")
        try:
            with corolla.AutoDistributedModelForCausalLM.from_pretrained(
                model, initial_peers=[chain[0].maddr], dht_prefix=PREFIX, use_relay=False, auto_nat=False
            ) as remote:

                def generate(n: int) -> None:
                    remote.generate(prompt, max_new_tokens=n, eos_token_id=[])

                generate(4)
                generate(new_tokens)  # warm-up: the route choice settles
                rates = []
                for _ in range(runs):
                    started = time.perf_counter()
                    generate(new_tokens)
                    rates.append(new_tokens / (time.perf_counter() - started))
        finally:
            for server in chain:
                server.stop()
    print(json.dumps({"tokens_per_s": statistics.median(rates)}))


def measure(app: str, servers: int, new_tokens: int, runs: int) -> float:
    env = {**os.environ, "PYTHONPATH": app}
    command = [sys.executable, __file__, "--worker", str(servers), "--new-tokens", str(new_tokens), "--runs", str(runs)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(lines[-1])["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", help="the other checkout's app/ folder (its PYTHONPATH)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5, help="timed generations per chain start (median)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.new_tokens, args.runs)
        return
    if not args.baseline:
        parser.error("--baseline is required")
    apps = {"baseline": args.baseline, "this": str(Path(__file__).resolve().parents[1] / "app")}
    report: dict = {"load_average_before": [round(x, 2) for x in os.getloadavg()], "apps": apps}
    rates: dict = {name: {n: [] for n in CHAINS} for name in apps}
    for round_ in range(args.rounds):
        for n in CHAINS:
            order = list(apps) if round_ % 2 == 0 else list(reversed(apps))
            for name in order:
                rates[name][n].append(round(measure(apps[name], n, args.new_tokens, args.runs), 1))
    report["tokens_per_s_per_round"] = rates
    medians = {name: {n: statistics.median(v) for n, v in by_chain.items()} for name, by_chain in rates.items()}
    report["median_tokens_per_s"] = medians
    report["ms_per_extra_hop"] = {name: round((1000 / m[3] - 1000 / m[1]) / 2, 3) for name, m in medians.items()}
    report["this_over_baseline"] = {n: round(medians["this"][n] / medians["baseline"][n], 3) for n in CHAINS}
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
