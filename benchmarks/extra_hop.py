"""What one extra server costs a token, with both chains and the yardstick measured at the same time.

`client_tokens_per_second.py` takes the extra hop as (3 servers - 1 server) / 2 from two chains timed
minutes apart; on a shared 2-core machine each of those moves by a third from one run to the next, so
their difference says little. Here a 1-server and a 3-server chain of the tiny Llama run at once (two
swarms under two DHT prefixes), the default client of each takes its turn generation by generation
(the order alternating each round), and a raw p2pd stream round trip (server_step_latency.py's echo,
the issue's yardstick: an extra hop should cost at most twice it) is timed in every round too. Each
round gives an extra hop and a yardstick from the same seconds; the report gives their medians and in
how many rounds the hop was within the limit.

Usage (as root, preferably in a loopback-only namespace; about 2 minutes):
    unshare -n sh -c 'ip link set lo up && PYTHONPATH=app .venv/bin/python benchmarks/extra_hop.py'
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import corolla
from corolla.testing.swarm import make_reference_model, start_chain
from server_step_latency import echo_peer, measure_echo

CHAINS = {1: ["0:4"], 3: ["0:2", "2:3", "3:4"]}
PROMPT = torch.tensor([[1, 384, 456]])
HOP_OVER_RAW = 2.0


def ms_per_token(remote, new_tokens: int) -> float:
    started = time.perf_counter()
    remote.generate(PROMPT, max_new_tokens=new_tokens, eos_token_id=[])
    return 1000 * (time.perf_counter() - started) / new_tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--echo-steps", type=int, default=60, help="raw round trips timed per round")
    args = parser.parse_args()
    report: dict = {"load_average_before": [round(x, 2) for x in os.getloadavg()], "rounds": args.rounds}
    servers, clients = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            model = make_reference_model(tmp / "model", "hop-1")
            for n, chain in CHAINS.items():
                prefix = f"hop-{n}"  # two swarms side by side: each client sees its own chain only
                servers += (chain_servers := start_chain(tmp, model, chain, "--dht-prefix", prefix, name=f"hop-{n}"))
                clients[n] = corolla.AutoDistributedModelForCausalLM.from_pretrained(
                    model, initial_peers=[chain_servers[0].maddr], dht_prefix=prefix, use_relay=False, auto_nat=False
                )
                clients[n].wait_for_route(60)
                ms_per_token(clients[n], 8)  # warm-up: sessions, direct links, the route choice
            per_round = []
            with echo_peer() as (echo_client, echo_server):
                for k in range(args.rounds):
                    order = list(CHAINS) if k % 2 == 0 else list(reversed(CHAINS))
                    ms = {n: ms_per_token(clients[n], args.new_tokens) for n in order}
                    raw = 1000 * statistics.median(measure_echo(echo_client, echo_server, 64, args.echo_steps))
                    hop = (ms[3] - ms[1]) / 2
                    per_round.append({"ms_per_token": ms, "extra_hop_ms": hop, "raw_round_trip_ms": raw})
        finally:
            for client in clients.values():
                client.close()
            for server in servers:
                server.stop()
    hops = [r["extra_hop_ms"] for r in per_round]
    raws = [r["raw_round_trip_ms"] for r in per_round]
    report["ms_per_token"] = {n: round(statistics.median(r["ms_per_token"][n] for r in per_round), 3) for n in CHAINS}
    report["extra_hop_ms"] = round(statistics.median(hops), 3)
    report["extra_hop_ms_range"] = [round(min(hops), 3), round(max(hops), 3)]
    report["raw_round_trip_ms"] = round(statistics.median(raws), 3)
    report["target_ms_per_extra_hop"] = round(HOP_OVER_RAW * report["raw_round_trip_ms"], 3)
    report["hop_over_raw_round_trip"] = round(report["extra_hop_ms"] / report["raw_round_trip_ms"], 2)
    report["rounds_within_target"] = sum(h <= HOP_OVER_RAW * r for h, r in zip(hops, raws, strict=True))
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
