"""Slow and stalling servers (issue 27): what each costs a 16-token greedy generation, with this client's
adaptive deadlines and hedging, and with the fixed 30 s step timeout alone (the behaviour before).

One swarm of the tiny random-weight model on 127.0.0.1: an honest float32 server of the whole model and
slow ones (tests/support/slow_server.py, right outputs, late answers, a high announced speed):
never answers, answers every step 20 s late, stalls after 5 honest steps. For each, in the same run:
the generation routed first through it, against the same generation through the honest server alone
(the baseline), with `hedge` on (the default) and with the adaptive deadline off (its floor set to
request_timeout, so a stall is noticed only when the 30 s timeout runs out, as before). Also how long
generate() waits on its spot checks at the end when the only checker never answers.

Targets (the issue): never answers <= baseline + 5 s; 20 s per step and stall-after-5 <= baseline + 10 s;
a stalling checker holds generate() <= 1 s. Outputs are compared token for token with the baseline.
Usage (as root, in a loopback-only namespace):
    unshare -n sh -c 'ip link set lo up && PYTHONPATH=app .venv/bin/python benchmarks/slow_servers.py'
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import corolla
from corolla.swarm.client.speed import speed_of
from corolla.swarm.models.tiny import make_tiny_model
from corolla.testing.swarm import REPO, CorollaServer, route_first_through

PREFIX = "bench-slow"
SLOW = [sys.executable, str(REPO / "tests" / "support" / "slow_server.py")]
KINDS = {"never answers": "stall", "20 s per step": "delay:20", "stalls after 5 steps": "after:5:stall"}
PROMPT = torch.tensor([[1, 384, 456, 17, 99, 23]])
TIMEOUT_S = 30.0


def serve(tmp: Path, model: Path, name: str, join: list[str], slowness: str | None = None) -> CorollaServer:
    return CorollaServer(
        tmp,
        model,
        *join,
        "--dht-prefix",
        PREFIX,
        "--blocks",
        "0:6",
        "--torch-dtype",
        "float32",
        "--throughput",
        "10" if slowness is None else "1000",
        "--step-timeout",
        "120",
        name=name,
        launcher=[] if slowness is None else [*SLOW, slowness, "--"],
    )


def client(model: Path, maddr: str, allowed: list[str], adaptive: bool, rate: float = 0.0):
    return corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model,
        initial_peers=[maddr],
        dht_prefix=PREFIX,
        use_relay=False,
        auto_nat=False,
        allowed_servers=allowed,
        spot_check_rate=rate,
        request_timeout=TIMEOUT_S,
        step_deadline_floor=3.0 if adaptive else TIMEOUT_S,
        max_retries=3,
    )


def generate(model, new_tokens: int, streamer=None) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    tokens = model.generate(PROMPT, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[], streamer=streamer)
    return tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--skip-fixed-timeout", action="store_true", help="skip the runs with the 30 s timeout only")
    args = parser.parse_args()
    result: dict = {"new_tokens": args.new_tokens, "request_timeout_s": TIMEOUT_S}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_tiny_model("llama", tmp / "model")
        servers = {"honest": serve(tmp, model, "honest", ["--new-swarm"])}
        join = ["--initial-peers", servers["honest"].maddr]
        for name, slowness in KINDS.items():
            servers[name] = serve(tmp, model, name.replace(" ", "-"), join, slowness)
        try:
            for server in servers.values():
                server.wait_state("online", timeout=300)
            maddr, honest = servers["honest"].maddr, servers["honest"].peer_id
            base = client(model, maddr, [honest], adaptive=True)
            try:
                generate(base, args.new_tokens)  # warm-up
                runs = [generate(base, args.new_tokens) for _ in range(3)]
            finally:
                base.close()
            want = runs[0][0]
            baseline = min(seconds for _, seconds in runs)
            result["baseline_s"] = round(baseline, 3)
            modes = {"adaptive + hedging": True} | ({} if args.skip_fixed_timeout else {"fixed 30 s timeout": False})
            for name in KINDS:
                peer = servers[name].peer_id
                result[name] = {}
                for mode, adaptive in modes.items():
                    if name == "20 s per step" and not adaptive:  # every step is inside the 30 s timeout
                        result[name][mode] = {"seconds": None, "note": "never left: >= 20 s per token"}
                        continue
                    m = client(model, maddr, [honest, peer], adaptive)
                    try:
                        route_first_through(m, peer)
                        tokens, seconds = generate(m, args.new_tokens)
                        speed = speed_of(m.view)
                        result[name][mode] = {
                            "seconds": round(seconds, 2),
                            "beyond_baseline_s": round(seconds - baseline, 2),
                            "exact": bool(torch.equal(tokens, want)),
                            "hedges_won": speed.hedges_won,
                        }
                    finally:
                        m.close()
                    print(name, mode, result[name][mode], file=sys.stderr, flush=True)
            checked = client(model, maddr, [honest, servers["never answers"].peer_id], adaptive=True, rate=1.0)
            try:
                route_first_through(checked, honest)
                waits = []
                for _ in range(3):
                    last: list[float] = []
                    tokens, _ = generate(
                        checked, args.new_tokens, lambda ids, last=last: last.append(time.perf_counter())
                    )
                    waits.append(time.perf_counter() - last[-1])
                result["stalling checker"] = {"waited_on_checks_s": [round(w, 3) for w in waits]}
            finally:
                checked.close()
        finally:
            for server in servers.values():
                server.kill()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
