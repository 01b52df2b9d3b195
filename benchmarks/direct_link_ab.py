"""Direct links against p2pd on the same servers, steps interleaved: tokens/s of a greedy generation
through 1 and 3 Corolla servers for two clients at once, one with direct links (the default), one with
them off (every step through both p2pd daemons), their generations taken in turn so both see the same
load; the cost of one extra hop for each; and a raw hivemind stream round trip in the same run (the
issue's yardstick: an extra hop should cost at most twice that).

Usage (as root, preferably in a loopback-only namespace; about 3 minutes):
    unshare -n sh -c 'ip link set lo up && .venv/bin/python benchmarks/direct_link_ab.py'
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
from server_step_latency import echo_peer, measure_echo, summary

PREFIX = "bench-llama-hf"
CHAINS = {1: ["0:4"], 3: ["0:2", "2:3", "3:4"]}
PROMPT = torch.tensor([[1, 384, 456]])
MODES = {"direct": True, "p2pd": False}


def ms_per_token(remote, new_tokens: int) -> float:
    started = time.perf_counter()
    remote.generate(PROMPT, max_new_tokens=new_tokens, eos_token_id=[])
    return 1000 * (time.perf_counter() - started) / new_tokens


def chain_ms(tmp: Path, model: Path, chain: list[str], new_tokens: int, rounds: int) -> dict:
    servers = start_chain(tmp, model, chain, name=f"direct-ab-{len(chain)}")
    clients = {}
    try:
        for mode, direct in MODES.items():
            clients[mode] = corolla.AutoDistributedModelForCausalLM.from_pretrained(
                model,
                initial_peers=[servers[0].maddr],
                dht_prefix=PREFIX,
                use_relay=False,
                auto_nat=False,
                direct_links=direct,
            )
            clients[mode].wait_for_route(60)
            ms_per_token(clients[mode], 8)  # warm-up: sessions, route choice
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for k in range(rounds):
            order = list(MODES) if k % 2 == 0 else list(reversed(MODES))
            for mode in order:
                times[mode].append(ms_per_token(clients[mode], new_tokens))
        with clients["direct"].inference_session(max_length=16) as session:
            clients["direct"].generate(PROMPT, max_new_tokens=2, session=session)
            used = [stream.direct for stream in session._session.streams]
        return {
            "ms_per_token": {mode: round(statistics.median(v), 3) for mode, v in times.items()},
            "direct_faster_in_rounds": sum(d < p for d, p in zip(times["direct"], times["p2pd"], strict=True)),
            "rounds": rounds,
            "direct_links_used": used,
        }
    finally:
        for client in clients.values():
            client.close()
        for server in servers:
            server.stop()


def raw_round_trip() -> dict:
    with echo_peer(in_process=True) as (client, peer):
        return summary(measure_echo(client, peer, 64, 200))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    report: dict = {"load_average_before": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_reference_model(tmp / "model", PREFIX)
        report["raw_stream_round_trip"] = raw_round_trip()
        chains = {n: chain_ms(tmp, model, chain, args.new_tokens, args.rounds) for n, chain in CHAINS.items()}
    report["chains"] = chains
    report["ms_per_extra_hop"] = {
        mode: round((chains[3]["ms_per_token"][mode] - chains[1]["ms_per_token"][mode]) / 2, 3) for mode in MODES
    }
    report["target_ms_per_extra_hop"] = round(2 * report["raw_stream_round_trip"]["median_ms"], 3)
    report["tokens_per_s"] = {
        n: {mode: round(1000 / ms, 1) for mode, ms in run["ms_per_token"].items()} for n, run in chains.items()
    }
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
