"""The cost of one extra server in a chain, for the servers of two code trees (A: a baseline checkout,
B: this one) side by side in one run, interleaved token step by token step: on a busy shared machine,
two benchmark runs minutes apart (or two generations a second apart) see different loads, and an
effect of tens of microseconds per hop drowns in that.

Both trees' servers run at once, each tree with a 1-server and a 3-server chain of the tiny Llama
(client_tokens_per_second.py's chains, each under its own DHT prefix), reached by one client per chain
in this process (so the client code is this process's for both: this compares server-side changes).
Each round opens one inference session per chain and sends `--steps` single-token steps through each,
one chain after the other in turn (routed as the default client chooses: pushed between servers on
loopback, as generate() sends them), then times a raw stream round trip (server_step_latency.py's
echo). The report gives each chain's median ms per step over all steps, the ms one extra hop costs
((3 servers - 1 server) / 2), and B's minus A's per round.

Usage (root; loopback only):
    unshare -n sh -c 'ip link set lo up && PYTHONPATH=app .venv/bin/python benchmarks/hop_ab.py --a /work/main/app'
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import corolla
from corolla.testing.swarm import make_reference_model, start_chain
from server_step_latency import echo_peer, measure_echo

PREFIX = "bench-llama-hf"
CHAINS = {1: ["0:4"], 3: ["0:2", "2:3", "3:4"]}
PROMPT = torch.tensor([[1, 384, 456]])
HERE = Path(__file__).resolve().parent


def ms_per_token(remote, new_tokens: int) -> float:
    started = time.perf_counter()
    remote.generate(PROMPT, max_new_tokens=new_tokens, eos_token_id=[])
    return (time.perf_counter() - started) * 1000 / new_tokens


def interleaved_steps(remotes: dict, steps: int, hidden_size: int) -> dict:
    """ms of each of `steps` token steps per chain, the chains taking turns step by step."""
    hidden = torch.randn(1, 1, hidden_size)
    sessions = {key: remote.inference_session(max_length=steps + 8) for key, remote in remotes.items()}
    times: dict = {key: [] for key in remotes}
    try:
        for session in sessions.values():
            session.step(hidden)  # opens the route
        keys = list(sessions)
        for i in range(steps):
            for key in keys[i % len(keys) :] + keys[: i % len(keys)]:
                started = time.perf_counter()
                sessions[key].step(hidden)
                times[key].append((time.perf_counter() - started) * 1000)
    finally:
        for session in sessions.values():
            session.close()
    return times


def hop_ms(per_token: dict[int, float]) -> float:
    return (per_token[3] - per_token[1]) / 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--a", required=True, help="the baseline tree's app folder (its servers' PYTHONPATH)")
    parser.add_argument("--b", default=str(HERE.parent / "app"), help="the other tree's app folder")
    parser.add_argument(
        "--b-env", action="append", default=[], metavar="KEY=VALUE", help="set for B's servers and clients only"
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=200, help="token steps per chain and round")
    args = parser.parse_args()
    trees = {"a": str(Path(args.a).resolve()), "b": str(Path(args.b).resolve())}
    b_env = dict(item.split("=", 1) for item in args.b_env)
    report: dict = {"trees": trees, "b_env": b_env, "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    own_path = os.environ.get("PYTHONPATH")
    servers, remotes = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            model = make_reference_model(tmp / "model", PREFIX)
            for tree, path in trees.items():
                os.environ["PYTHONPATH"] = path  # the servers started now run this tree's code
                for key, value in b_env.items():  # and B's servers, clients and their p2pd see these
                    if tree == "b":
                        os.environ[key] = value
                    else:
                        os.environ.pop(key, None)
                for n, chain in CHAINS.items():
                    servers += start_chain(tmp, model, chain, "--dht-prefix", f"{tree}{n}", name=f"{tree}-{n}")
                    remotes[tree, n] = corolla.AutoDistributedModelForCausalLM.from_pretrained(
                        model,
                        initial_peers=[servers[-len(chain)].maddr],
                        dht_prefix=f"{tree}{n}",
                        use_relay=False,
                        auto_nat=False,
                    )
            for key in b_env:
                os.environ.pop(key, None)
            if own_path is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = own_path
            for (_, n), remote in remotes.items():
                ms_per_token(remote, 8)  # warm-up: routes, sessions, the servers' first steps
                assert remote.route().count("via") == n
                ms_per_token(remote, 64)
            hidden_size = next(iter(remotes.values())).config.hidden_size
            rounds: list[dict] = []
            with echo_peer() as (client, peer):
                for r in range(args.rounds):
                    times = interleaved_steps(remotes, args.steps, hidden_size)
                    raw = statistics.median(measure_echo(client, peer, 64, 100)) * 1000
                    rounds.append({"ms": times, "raw_ms": raw})
                    medians = {f"{tree}{n}": round(statistics.median(v), 3) for (tree, n), v in times.items()}
                    print(f"round {r + 1}/{args.rounds}: ms per step {medians}, raw {raw:.3f}", file=sys.stderr)
        finally:
            for remote in remotes.values():
                remote.close()
            for server in servers:
                server.stop()
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["rounds"], report["steps_per_round"] = len(rounds), args.steps
    raw = statistics.median(r["raw_ms"] for r in rounds)
    report["raw_stream_round_trip_median_ms"] = round(raw, 3)
    report["target_ms_per_extra_hop"] = round(2 * raw, 3)
    for tree in trees:
        per_step = {n: statistics.median(t for r in rounds for t in r["ms"][tree, n]) for n in CHAINS}
        report[tree] = {
            "median_ms_per_step": {n: round(ms, 3) for n, ms in per_step.items()},
            "ms_per_extra_hop": round(hop_ms(per_step), 3),
        }
    paired = [
        hop_ms({n: statistics.median(r["ms"]["b", n]) for n in CHAINS})
        - hop_ms({n: statistics.median(r["ms"]["a", n]) for n in CHAINS})
        for r in rounds
    ]
    report["b_minus_a_ms_per_extra_hop"] = {
        "median": round(statistics.median(paired), 3),
        "rounds_b_faster": sum(d < 0 for d in paired),
        "per_round": [round(d, 3) for d in paired],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
