"""Tokens/s of a 64-token greedy generation through 1, 2 and 3 servers, in one run, beside:
the same model's local `generate()`, the stock Petals 2.2 client and servers on the same model and
chains, and a raw hivemind stream round trip (the floor of one extra hop). Corolla twice per chain, on
the same servers: the default client (push and speculative steps where they pay: route_choice.py) and
the same client told to push on every hop and draft on every generation (the default before that choice).

Targets: Corolla >= 3x Petals tokens/s on the tiny model; each extra hop costs <= 2x the raw round trip.
Usage (as root, preferably in a loopback-only namespace):
    unshare -n sh -c 'ip link set lo up && .venv/bin/python benchmarks/client_tokens_per_second.py'
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import corolla
from corolla.swarm.peers import start_dht
from corolla.testing.swarm import (
    PetalsServer,
    make_reference_model,
    reference_python,
    run_reference_script,
    start_chain,
)
from server_step_latency import echo_peer, measure_echo, summary

PREFIX = "bench-llama-hf"
CHAINS = {1: ["0:4"], 2: ["0:2", "2:4"], 3: ["0:2", "2:3", "3:4"]}
PROMPT = torch.tensor([[1, 384, 456]])


def time_generate(fn, new_tokens: int) -> float:
    fn(4)  # warm-up
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        fn(new_tokens)
        runs.append(time.perf_counter() - started)
    return new_tokens / sorted(runs)[1]


def corolla_chain(tmp: Path, model: Path, chain: list[str], new_tokens: int, everywhere: bool = False) -> dict:
    """Tokens/s of the default client (push and speculation where they pay: route_choice.py) and, with
    `everywhere`, of the same client told to push on every hop and draft on every generation (what the
    default was before the choice), on the same servers."""
    servers = start_chain(tmp, model, chain, name=f"corolla-{len(chain)}")
    try:
        with corolla.AutoDistributedModelForCausalLM.from_pretrained(
            model, initial_peers=[servers[0].maddr], dht_prefix=PREFIX, use_relay=False, auto_nat=False
        ) as remote:
            assert remote.route().count("via") == len(chain)
            out = {
                "auto": time_generate(lambda n: remote.generate(PROMPT, max_new_tokens=n, eos_token_id=[]), new_tokens)
            }
            out["choice"] = auto_choice(remote)
            if everywhere:
                remote.client_config.use_server_to_server = True
                out["everywhere"] = time_generate(
                    lambda n: remote.generate(PROMPT, max_new_tokens=n, eos_token_id=[], prompt_lookup_num_tokens=8),
                    new_tokens,
                )
            return out
    finally:
        for server in servers:
            server.stop()


def petals_chain(tmp: Path, model: Path, chain: list[str], new_tokens: int) -> float:
    bootstrap = start_dht(use_relay=False, auto_nat=False)
    servers = []
    try:
        maddr = str(bootstrap.get_visible_maddrs()[0])
        servers = [
            PetalsServer(tmp, model, maddr, blocks, PREFIX, name=f"petals-{len(chain)}-{i}")
            for i, blocks in enumerate(chain)
        ]
        for server in servers:
            server.wait_started()
        result = run_reference_script(
            Path(__file__).resolve().parents[1] / "tests" / "interop" / "petals_generate_speed.py",
            str(model),
            maddr,
            PREFIX,
            str(new_tokens),
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(result.stderr[-2000:])
        return json.loads(lines[-1])["tokens_per_s"]
    finally:
        for server in servers:
            server.stop()
        bootstrap.shutdown()


def auto_choice(remote) -> dict:
    """What the default client chose on this route after its runs (route_choice.py): hops pushed into,
    whether the last generation drafted, and the round trips the choice rests on."""
    from corolla.swarm.client import route_choice

    view = remote.view
    peers = [segment.peer_id for segment in view.route(0, view.num_blocks)]
    rtts = route_choice.link_rtts(view, peers)
    pings = [getattr(view.spans.get(p), "server_info", None) for p in peers]
    pings = [info.next_pings if info is not None else None for info in pings]
    linked = {peer.to_base58() for peer in view.direct_links.opened}
    direct = [peer in linked for peer in peers]  # whether the client's steps went direct_link.py's way
    return {
        "pushed_hops": route_choice.pushed_hops(None, peers, rtts, pings, direct),
        "direct_links": direct,
        "speculation": remote.speculation is not None,
        "link_rtt_ms": [round(1000 * rtts[p], 2) if p in rtts else None for p in peers],
        # Each server's announced round trip to the next one (None: not measured; inf: did not answer).
        "announced_next_ms": [
            None if ping is None or nxt not in ping else round(1000 * ping[nxt], 2)
            for ping, nxt in zip(pings[:-1], peers[1:], strict=True)
        ],
    }


def traced_hops(folder: Path, new_tokens: int) -> dict:
    """The 3-server chain with step traces on (which cost time of their own): where each hop's time goes."""
    from corolla.swarm import steptrace
    from hop_trace import hops

    os.environ[steptrace.ENV] = str(folder)  # the servers inherit it
    steptrace.set_directory(str(folder))
    with tempfile.TemporaryDirectory() as tmp:
        model = make_reference_model(Path(tmp) / "model", PREFIX)
        tokens_per_s = corolla_chain(Path(tmp), model, CHAINS[3], new_tokens)["auto"]
    steptrace.set_directory(None)
    return {"corolla_tokens_per_s_traced": round(tokens_per_s, 1), "median_ms_per_hop": hops(folder)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-petals", action="store_true")
    parser.add_argument("--trace", metavar="DIR", help="only the 3-server chain, step-traced: legs per hop")
    args = parser.parse_args()
    if args.trace:
        print(json.dumps(traced_hops(Path(args.trace), args.new_tokens), indent=2))
        return
    report: dict = {"new_tokens": args.new_tokens, "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_reference_model(tmp / "model", PREFIX)
        local = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        report["local_generate_tokens_per_s"] = round(
            time_generate(
                lambda n: local.generate(
                    PROMPT, max_new_tokens=n, min_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(PROMPT)
                ),
                args.new_tokens,
            ),
            1,
        )
        with echo_peer() as (client, peer):
            report["raw_stream_round_trip"] = summary(measure_echo(client, peer, 64, 200))
        runs = {n: corolla_chain(tmp, model, chain, args.new_tokens, everywhere=True) for n, chain in CHAINS.items()}
        report["corolla_tokens_per_s"] = {n: round(run["auto"], 1) for n, run in runs.items()}
        report["corolla_choice"] = {n: run["choice"] for n, run in runs.items()}
        report["corolla_push_and_drafts_everywhere_tokens_per_s"] = {
            n: round(r["everywhere"], 1) for n, r in runs.items()
        }
        if not args.skip_petals and reference_python().exists():
            report["petals_tokens_per_s"] = {
                n: round(petals_chain(tmp, model, CHAINS[n], args.new_tokens), 1) for n in CHAINS
            }
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    per_token_ms = {n: 1000 / tps for n, tps in report["corolla_tokens_per_s"].items()}
    report["corolla_ms_per_extra_hop"] = round((per_token_ms[3] - per_token_ms[1]) / 2, 3)
    report["target_ms_per_extra_hop"] = round(2 * report["raw_stream_round_trip"]["median_ms"], 3)
    if "petals_tokens_per_s" in report:
        report["corolla_over_petals"] = {
            n: round(report["corolla_tokens_per_s"][n] / tps, 2) for n, tps in report["petals_tokens_per_s"].items()
        }
        report["target_ratio"] = 3.0
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
