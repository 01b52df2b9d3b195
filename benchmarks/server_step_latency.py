"""Per-step latency of one inference step ([1, 1, hidden]) through a span, from a client on loopback.

Measured in one run, one after the other, with the same client code:
- raw: a hivemind stream round trip to an echo handler in another process (transport only);
- compute: the span's own step time, in-process (no network), on the cache a server session gets
  (and, beside it, on the static cache);
- corolla: a Corolla block server serving the span;
- petals: a stock Petals 2.2 server serving the same span (needs ../shared/reference-petals' venv).
Targets: corolla - raw - compute <= 1 ms; corolla <= 0.5 x petals. Prints JSON. `--no-petals` skips
the stock server (the per-step overhead figures, every run, in a minute).

Usage (as root, preferably in a loopback-only namespace):
    unshare -n sh -c 'ip link set lo up && .venv/bin/python benchmarks/server_step_latency.py'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import AsyncIterator  # noqa: UP035  (hivemind reads typing.AsyncIterator annotations)

import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from corolla.swarm import protocol
from corolla.swarm.models import load_span
from corolla.swarm.peers import start_dht
from corolla.swarm.server.handler import TransformerConnectionHandler
from corolla.testing.swarm import CorollaServer, PetalsServer, make_reference_model, reference_python

PREFIX = "bench-llama-hf"


class EchoServicer(ServicerBase):
    async def rpc_echo(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for request in requests:
            yield runtime_pb2.ExpertResponse(tensors=request.tensors)


def run_echo_server() -> None:
    dht = start_dht(use_relay=False, auto_nat=False)

    async def main():
        p2p = await dht.replicate_p2p()
        await EchoServicer().add_p2p_handlers(p2p)
        print(json.dumps({"maddr": str(dht.get_visible_maddrs()[0])}), flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())


def _step_request(uid: str, hidden: torch.Tensor, metadata: dict) -> runtime_pb2.ExpertRequest:
    tensors = [serialize_torch_tensor(t) for t in (hidden, torch.zeros(0), torch.zeros(0, dtype=torch.int64))]
    metadata = {"args_structure": ((b"__T0", b"__T1", b"__T2"), {}), **metadata}
    return runtime_pb2.ExpertRequest(uid=uid, tensors=tensors, metadata=MSGPackSerializer.dumps(metadata))


async def _time_stream(open_stream, first, make_step, steps: int) -> list[float]:
    """Send `first`, then `steps` requests one at a time, each after the previous reply."""
    replies: asyncio.Queue = asyncio.Queue()
    sent_at: list[float] = []

    async def producer():
        yield first
        await replies.get()
        for i in range(steps):
            sent_at.append(time.perf_counter())
            yield make_step(i)
            await replies.get()
        yield runtime_pb2.ExpertRequest()

    latencies = []
    async for _ in await open_stream(producer()):
        if len(sent_at) > len(latencies):
            latencies.append(time.perf_counter() - sent_at[-1])
        replies.put_nowait(None)
    return latencies


def measure_span_server(client_dht, peer_id: str, hidden: int, blocks: int, steps: int) -> list[float]:
    uid = protocol.chain_uids(PREFIX, 0, blocks)
    session = str(uuid.uuid4())
    x = torch.randn(1, 1, hidden)

    async def run():
        p2p = await client_dht.replicate_p2p()
        stub = TransformerConnectionHandler.get_stub(p2p, PeerID.from_base58(peer_id))
        first = _step_request(
            uid,
            x,
            {"session_id": session, "step_id": "0", "max_length": steps + 8, "start_from_position": 0, "points": 0.0},
        )
        return await _time_stream(
            stub.rpc_inference,
            first,
            lambda i: _step_request(
                uid, x, {"session_id": session, "step_id": str(i + 1), "start_from_position": i + 1}
            ),
            steps,
        )

    return asyncio.run(run())


def measure_echo(client_dht, peer_id: str, hidden: int, steps: int) -> list[float]:
    x = torch.randn(1, 1, hidden)

    async def run():
        p2p = await client_dht.replicate_p2p()
        stub = EchoServicer.get_stub(p2p, PeerID.from_base58(peer_id))
        request = _step_request("echo", x, {"step_id": "x"})
        return await _time_stream(stub.rpc_echo, request, lambda i: request, steps)

    return asyncio.run(run())


@contextlib.contextmanager
def echo_peer(in_process: bool = False) -> Iterator[tuple]:
    """An echo server in a process of its own and a client DHT that reaches it: (client_dht, peer_id)
    for `measure_echo`, the raw stream round trip every loopback benchmark compares with. On exit both
    go, the server with its process group (the DHT process and p2pd it forks)."""
    echo = subprocess.Popen(
        [sys.executable, __file__, "--echo-server"], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    client = None
    try:
        maddr = json.loads(echo.stdout.readline())["maddr"]
        client = start_dht([maddr], client_mode=True, use_relay=False, auto_nat=False, in_process=in_process)
        yield client, maddr.rsplit("/", 1)[-1]
    finally:
        if client is not None:
            client.shutdown()
        os.killpg(echo.pid, signal.SIGKILL)
        echo.wait()


def measure_compute(model_dir: Path, blocks: int, steps: int, static: bool | None = None) -> list[float]:
    """The span's own step time in-process, on the cache a server session of this max_length gets
    (`static` None), or on the static / the dynamic cache."""
    torch.set_num_threads(1)
    span = load_span(model_dir, 0, blocks)
    cache = span.new_cache(steps + 8, static=static)
    x = torch.randn(1, 1, span.hidden_size)
    span(x, cache)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        span(x, cache)
        times.append(time.perf_counter() - started)
    return times


def summary(values: list[float]) -> dict:
    ms = sorted(v * 1000 for v in values)
    return {
        "median_ms": round(statistics.median(ms), 3),
        "p10_ms": round(ms[len(ms) // 10], 3),
        "p90_ms": round(ms[9 * len(ms) // 10], 3),
        "n": len(ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--no-petals", action="store_true", help="skip the stock Petals server (faster)")
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        run_echo_server()
        return
    report: dict = {"steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_reference_model(tmp / "model", PREFIX)
        config = json.loads((model / "config.json").read_text())
        hidden, blocks = config["hidden_size"], config["num_hidden_layers"]
        report["model"] = {"hidden_size": hidden, "blocks": blocks}
        report["compute"] = summary(measure_compute(model, blocks, args.steps))
        report["compute_static_cache"] = summary(measure_compute(model, blocks, args.steps, static=True))

        with echo_peer() as (client, peer):
            report["raw_stream_round_trip"] = summary(measure_echo(client, peer, hidden, args.steps))

        server = CorollaServer(
            tmp,
            model,
            "--new-swarm",
            "--blocks",
            f"0:{blocks}",
            "--torch-dtype",
            "float32",
            "--throughput",
            "10",
            name="corolla",
        )
        try:
            client = start_dht([server.maddr], client_mode=True, use_relay=False, auto_nat=False)
            report["corolla"] = summary(measure_span_server(client, server.peer_id, hidden, blocks, args.steps))
            client.shutdown()
        finally:
            server.stop()

        if reference_python().exists() and not args.no_petals:
            seed = CorollaServer(
                tmp,
                model,
                "--new-swarm",
                "--blocks",
                "0:1",
                "--torch-dtype",
                "float32",
                "--throughput",
                "10",
                name="bootstrap",
            )  # a DHT for the Petals server to join
            petals = None
            try:
                petals = PetalsServer(tmp, model, seed.maddr, f"0:{blocks}", PREFIX)
                petals.wait_started()
                client = start_dht([seed.maddr], client_mode=True, use_relay=False, auto_nat=False)
                peer = _find_petals_peer(tmp / "petals-server.log")
                report["petals"] = summary(measure_span_server(client, peer, hidden, blocks, args.steps))
                client.shutdown()
            finally:
                if petals is not None:
                    petals.stop()
                seed.stop()
    corolla, raw, compute = (report[k]["median_ms"] for k in ("corolla", "raw_stream_round_trip", "compute"))
    report["corolla_overhead_ms"] = round(corolla - raw - compute, 3)
    # The host-side share of a server step (what CUDA graphs remove on a GPU): server step over compute.
    report["corolla_step_over_compute"] = round(corolla / compute, 2)
    report["target_overhead_ms"] = 1.0
    if "petals" in report:
        report["corolla_over_petals"] = round(corolla / report["petals"]["median_ms"], 3)
        report["target_ratio"] = 0.5
    print(json.dumps(report, indent=2))


def _find_petals_peer(log: Path) -> str:
    import re

    match = re.search(r"Running a server on \[[^\]]*?/p2p/(\w+)", log.read_text(errors="replace"))
    if match is None:
        raise RuntimeError("could not find the Petals server's peer id in its log")
    return match.group(1)


if __name__ == "__main__":
    main()
