"""Spot checks (issue 17): their cost in tokens/s, and how fast they catch a lying server.

One swarm of the tiny random-weight model on 127.0.0.1: three honest float32 servers of the whole
model and four liars (tests/support/liar_server.py: noise, zeros, previous step, honest for each
session's first 20 steps then zeros). In the same run:
- tokens/s of a 48-token greedy generation through honest servers with spot checks off and at each
  rate in RATES (interleaved rounds, median), and the overhead of each rate against "off";
- steps until each liar is caught at the default rate, over 20 runs (median and worst): with a fresh
  client (whose first steps with a server are all checked) and with a warm one (those steps spent).

Target: overhead <= 10 % at the default rate (ClientConfig.spot_check_rate).
Usage (as root, in a loopback-only namespace):
    unshare -n sh -c 'ip link set lo up && PYTHONPATH=app .venv/bin/python benchmarks/verification_overhead.py'
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import corolla
from corolla.swarm.client.config import ClientConfig
from corolla.swarm.client.verification import FIRST_STEPS, Ledger, ledger_of, promised_steps
from corolla.swarm.models.tiny import make_tiny_model
from corolla.testing.swarm import REPO, CorollaServer, route_first_through

PREFIX = "bench-verify"
LIAR = [sys.executable, str(REPO / "tests" / "support" / "liar_server.py")]
LIES = {"noise": ("noise:0.1", 1), "zeros": ("zeros", 1), "previous": ("previous", 2), "late": ("after:20:zeros", 21)}
RATES = [0.05, 0.1, 0.2, 0.5]
PROMPT = torch.tensor([[1, 384, 456, 17, 99]])


def serve(tmp: Path, model: Path, name: str, join: list[str], launcher: list[str] = ()) -> CorollaServer:
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
        "10",
        name=name,
        launcher=launcher,
    )


def client(model: Path, maddr: str, blocked: list[str], rate: float):
    return corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model,
        initial_peers=[maddr],
        dht_prefix=PREFIX,
        use_relay=False,
        auto_nat=False,
        blocked_servers=list(blocked),
        spot_check_rate=rate,
    )


def tokens_per_second(models: dict, new_tokens: int, rounds: int, primary: str) -> dict:
    for model in models.values():
        route_first_through(model, primary)
        model.generate(PROMPT, max_new_tokens=FIRST_STEPS + 2, do_sample=False)  # warm-up, first-step checks
    runs = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():  # interleaved: the machine's load hits every setting alike
            started = time.perf_counter()
            model.generate(PROMPT, max_new_tokens=new_tokens, do_sample=False)
            runs[name].append(new_tokens / (time.perf_counter() - started))
    return {name: {"median": statistics.median(v), "best": max(v)} for name, v in runs.items()}


def steps_until_caught(model, liar: str, lied_from: int, warm: bool, runs: int, new_tokens: int) -> dict:
    found = []
    for run in range(runs):
        model.view.verification = Ledger(rng=random.Random(run))
        model.view.config.blocked_servers = [p for p in model.view.config.blocked_servers if p != liar]
        model.view.bans.pop(liar, None)
        if warm:
            ledger_of(model.view).steps[liar] = FIRST_STEPS
        route_first_through(model, liar)
        model.generate(PROMPT, max_new_tokens=new_tokens, do_sample=False)
        evidence = ledger_of(model.view).flagged.get(liar)
        found.append(None if evidence is None or evidence["step"] is None else evidence["step"] - lied_from + 1)
    caught = [s for s in found if s is not None]
    return {
        "median": statistics.median(caught) if caught else None,
        "worst": max(caught) if len(caught) == len(found) else None,
        "not_caught": len(found) - len(caught),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--overhead-only", action="store_true", help="skip the liars' steps-until-caught runs")
    args = parser.parse_args()
    default = ClientConfig().spot_check_rate
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_tiny_model("llama", tmp / "model")
        servers = {"h1": serve(tmp, model, "h1", ["--new-swarm"])}
        join = ["--initial-peers", servers["h1"].maddr]
        servers["h2"] = serve(tmp, model, "h2", join)
        servers["h3"] = serve(tmp, model, "h3", join)
        for name, (lie, _) in LIES.items():
            servers[name] = serve(tmp, model, name, join, [*LIAR, lie, "--"])
        try:
            for server in servers.values():
                server.wait_state("online", timeout=300)
            maddr = servers["h1"].maddr
            liars = [servers[name].peer_id for name in LIES]
            models = {"off": client(model, maddr, liars, 0.0)}
            for rate in sorted({*RATES, default}):
                models[f"rate {rate}"] = client(model, maddr, liars, rate)
            try:
                speed = tokens_per_second(models, args.new_tokens, args.rounds, servers["h1"].peer_id)
            finally:
                for m in models.values():
                    m.close()
            caught = {}
            honest = [servers[n].peer_id for n in ("h1", "h2", "h3")]
            for name, (_, lied_from) in ({} if args.overhead_only else LIES).items():
                others = [p for p in liars if p != servers[name].peer_id]
                with client(model, maddr, others, default) as m:
                    new_tokens = 100 if name == "late" else 40
                    caught[name] = {
                        "fresh_client": steps_until_caught(
                            m, servers[name].peer_id, lied_from, False, args.runs, new_tokens
                        ),
                        "warm_client": steps_until_caught(
                            m, servers[name].peer_id, lied_from, True, args.runs, new_tokens
                        ),
                    }
                    assert not set(ledger_of(m.view).flagged) & set(honest)
        finally:
            for server in servers.values():
                server.stop()
    base = speed["off"]["median"]
    print(
        json.dumps(
            {
                "model": "tiny llama, 6 blocks, float32, whole model per server, 127.0.0.1",
                "new_tokens": args.new_tokens,
                "tokens_per_s": speed,
                "overhead_vs_off": {k: round(1 - v["median"] / base, 4) for k, v in speed.items() if k != "off"},
                "overhead_vs_off_best": {
                    k: round(1 - v["best"] / speed["off"]["best"], 4) for k, v in speed.items() if k != "off"
                },
                "default_rate": default,
                "first_steps_checked": FIRST_STEPS,
                "promised_steps_99.9%": promised_steps(default),
                "steps_until_caught_at_default_rate": caught,
                "target_overhead": 0.10,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
