"""Token-step latency to a block server from a client in its own process: through the server's own p2pd
with its handlers reached in-process (swarm/local_calls.py, the chat engine's client since issue 29's
one-p2pd change) against a client with its own DHT and p2pd dialling the server through both daemons
(the engine's client before). Prints JSON.

One process holds the real handler over a model's blocks on its own loop thread (as the block server),
the in-process caller and the p2pd caller on loops of their own; rounds alternate between them (one
session of `--steps` one-token steps each), so a busy machine slows both alike.

Usage: python benchmarks/local_calls.py [--model FOLDER] [--blocks N] [--rounds 6] [--steps 64]
       (with PYTHONPATH=app, ideally in `unshare -n`; without --model, a tiny Llama made in a temporary folder)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
import types
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from corolla.swarm.client.client_loop import ClientLoop
from corolla.swarm.client.routing import RouteSegment
from corolla.swarm.client.streams import ServerStream
from corolla.swarm.local_calls import LocalServer, SharedP2P
from corolla.swarm.models import load_span
from corolla.swarm.models.tiny import make_tiny_model
from corolla.swarm.peers import start_dht
from corolla.swarm.server.handler import HandlerLimits, TransformerConnectionHandler
from corolla.swarm.server.memory_cache import CacheBudget
from corolla.swarm.server.stats import ServerStats

PREFIX = "local-calls-bench"
MAX_LENGTH = 512


def serve(model: Path, blocks: int):
    span = load_span(model, 0, blocks)
    executor = ThreadPoolExecutor(max_workers=1)
    dht = start_dht(use_relay=False, auto_nat=False, in_process=True)
    loop = ClientLoop()

    async def attach():
        p2p = await dht.replicate_p2p()
        per_token_block = span.family.kv_dim(span.config) * 2 * span.dtype.itemsize
        budget = CacheBudget(blocks * 4 * MAX_LENGTH * per_token_block, per_token_block, max_alloc_timeout=1.0)
        limits = HandlerLimits(MAX_LENGTH, 4096, 16, 60.0, 600.0, 60.0)
        handler = TransformerConnectionHandler(span, PREFIX, budget, limits, ServerStats(), executor)
        await handler.attach(p2p)
        return p2p, LocalServer(p2p), handler

    _, local, handler = loop.run(attach(), timeout=60)
    return types.SimpleNamespace(span=span, dht=dht, loop=loop, local=local, handler=handler, executor=executor)


def session_seconds(loop: ClientLoop, p2p, server, steps: int, hidden: int) -> list[float]:
    async def run() -> list[float]:
        segment = RouteSegment(server.local.peer_id.to_base58(), 0, server.span.num_blocks)
        stream = ServerStream(segment, PREFIX, steps + 8)
        await stream.open(types.SimpleNamespace(p2p=p2p, stub=lambda peer: None), timeout=30)
        times = []
        try:
            await stream.step(torch.randn(1, 4, hidden), str(uuid.uuid4()), 0, timeout=60)
            for position in range(4, 4 + steps):
                started = time.perf_counter()
                await stream.step(torch.randn(1, 1, hidden), str(uuid.uuid4()), position, timeout=60)
                times.append(time.perf_counter() - started)
        finally:
            await stream.close()
        return times

    return loop.run(run(), timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--blocks", type=int, default=None, help="blocks served (default: all)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="corolla-local-calls-") as tmp:
        model = args.model or make_tiny_model("llama", Path(tmp) / "tiny", dht_prefix=PREFIX)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model))
        blocks = args.blocks or config.num_hidden_layers
        server = serve(Path(model), blocks)
        own_loop, other_loop = ClientLoop(), ClientLoop()
        own = own_loop.run(server.dht.new_p2p(), timeout=60)
        own = SharedP2P(own, server.local)
        maddrs = [str(a) for a in server.dht.get_visible_maddrs()]
        other_dht = start_dht(maddrs, client_mode=True, use_relay=False, auto_nat=False, in_process=True)
        other = other_loop.run(other_dht.replicate_p2p(), timeout=60)
        load_start = os.getloadavg()
        per_step = {"in_process": [], "through_p2pd": []}
        try:
            for _ in range(args.rounds):
                for label, loop, p2p in (("in_process", own_loop, own), ("through_p2pd", other_loop, other)):
                    per_step[label] += session_seconds(loop, p2p, server, args.steps, config.hidden_size)
        finally:
            for loop, p2p in ((own_loop, own), (other_loop, other)):
                with contextlib.suppress(Exception):
                    loop.run(p2p.shutdown(), timeout=10)
                loop.stop()
            other_dht.shutdown()
            with contextlib.suppress(Exception):
                server.loop.run(server.handler.detach(), timeout=10)
            server.loop.stop()
            server.dht.shutdown()
            server.executor.shutdown(wait=False)
        report = {
            "model": str(args.model or "tiny llama"),
            "blocks": blocks,
            "rounds": args.rounds,
            "steps_per_session": args.steps,
            "cpus": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in load_start],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        }
        for label, times in per_step.items():
            ms = sorted(t * 1000 for t in times)
            report[label] = {
                "median_ms": round(statistics.median(ms), 3),
                "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3),
                "tokens_per_s": round(len(ms) / (sum(ms) / 1000), 1),
            }
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
