"""What carrying a pushed step costs on each transport between two peers on loopback (two p2pd daemons).

A server-to-server push is either `rpc_push`, a unary call (p2pd opens a new libp2p stream for each
call and hands it to the receiving Python through its control connection), or, between two Corolla
servers, one message on a stream kept open (server/push_stream.py). Measured per transport, alternating
so both see the same load: `one_way_ms`, the send to the receiving handler's first look at the message,
and `round_trip_ms`, a call (or a message) and its answer; plus `new_stream_ms`, a fresh stream per
message (what a stream opened per push would cost). A push's ~2.3 KB payload (one hidden state of
a 576-wide model). Prints one JSON object.

Usage (the daemons listen on 127.0.0.1):
    unshare -n sh -c 'ip link set lo up && PYTHONPATH=app .venv/bin/python benchmarks/push_transport.py'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2


def _summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 3), "p90": round(ordered[int(len(ordered) * 0.9)], 3)}


async def measure(rounds: int) -> dict:
    receiver = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    sender = await P2P.create(
        host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[str(m) for m in await receiver.get_visible_maddrs()]
    )
    payload = runtime_pb2.ExpertRequest(uid="block.0", tensors=[runtime_pb2.Tensor(buffer=bytes(2304))])
    arrived: asyncio.Queue = asyncio.Queue()

    async def unary(request, context):
        arrived.put_nowait(time.perf_counter())
        return runtime_pb2.ExpertResponse()

    async def stream(info, reader, writer):
        while True:
            try:
                await P2P.receive_protobuf(runtime_pb2.ExpertRequest, reader)
            except Exception:
                return
            arrived.put_nowait(time.perf_counter())
            await P2P.send_protobuf(runtime_pb2.ExpertResponse(), writer)

    await receiver.add_protobuf_handler("bench.unary", unary, runtime_pb2.ExpertRequest)
    await receiver.add_binary_stream_handler("bench.stream", stream)
    _, reader, writer = await sender.call_binary_stream_handler(receiver.peer_id, "bench.stream")
    results: dict[str, dict[str, list[float]]] = {
        name: {"one_way_ms": [], "round_trip_ms": []} for name in ("unary_call", "open_stream", "new_stream")
    }
    try:
        for i in range(3 * rounds):
            kind = ("unary_call", "open_stream", "new_stream")[i % 3]
            started = time.perf_counter()
            if kind == "unary_call":
                call = asyncio.ensure_future(
                    sender.call_protobuf_handler(receiver.peer_id, "bench.unary", payload, runtime_pb2.ExpertResponse)
                )
                at = await arrived.get()
                await call
            elif kind == "open_stream":
                await P2P.send_protobuf(payload, writer)
                at = await arrived.get()
                await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
            else:
                fresh = await sender.call_binary_stream_handler(receiver.peer_id, "bench.stream")
                _, fresh_reader, fresh_writer = fresh
                await P2P.send_protobuf(payload, fresh_writer)
                at = await arrived.get()
                await P2P.receive_protobuf(runtime_pb2.ExpertResponse, fresh_reader)
                fresh_writer.close()
            ended = time.perf_counter()
            if i >= 30:  # warm-up
                results[kind]["one_way_ms"].append((at - started) * 1000)
                results[kind]["round_trip_ms"].append((ended - started) * 1000)
            await asyncio.sleep(0.002)  # pushes come one per token, not back to back
    finally:
        writer.close()
        await sender.shutdown()
        await receiver.shutdown()
    return {kind: {name: _summary(values) for name, values in legs.items()} for kind, legs in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=400, help="messages per transport")
    args = parser.parse_args()
    report = asyncio.run(measure(args.rounds))
    report["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
