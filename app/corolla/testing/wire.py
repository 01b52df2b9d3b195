"""A wire-level Petals client for tests: sends exactly the messages a test describes, malformed ones too."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from corolla.swarm.peers import start_dht
from corolla.swarm.server.handler import TransformerConnectionHandler

ARGS = ((b"__T0", b"__T1", b"__T2"), {})
DUMMY = torch.zeros(0)
DUMMY_IDS = torch.zeros(0, dtype=torch.int64)


def step_request(
    uid: str,
    hidden: torch.Tensor | None,
    *,
    hypo_ids: torch.Tensor = DUMMY_IDS,
    raw_metadata: bytes | None = None,
    **metadata,
) -> runtime_pb2.ExpertRequest:
    tensors = [] if hidden is None else [serialize_torch_tensor(t) for t in (hidden, DUMMY, hypo_ids)]
    metadata.setdefault("args_structure", ARGS)
    payload = raw_metadata if raw_metadata is not None else MSGPackSerializer.dumps(metadata)
    return runtime_pb2.ExpertRequest(uid=uid, tensors=tensors, metadata=payload)


@dataclass
class SessionResult:
    outputs: list[torch.Tensor] = field(default_factory=list)
    error: str | None = None


class WireClient:
    """A client-mode DHT peer with helpers for each RPC; use as a context manager."""

    def __init__(self, initial_peer: str):
        self.dht = start_dht([initial_peer], client_mode=True, use_relay=False, auto_nat=False, in_process=True)
        self.loop = asyncio.new_event_loop()
        self.p2p: P2P = self.loop.run_until_complete(self.dht.replicate_p2p())

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc) -> None:
        self.loop.run_until_complete(self.p2p.shutdown())
        self.loop.close()
        self.dht.shutdown()

    def run(self, coroutine, timeout: float = 60.0):
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, timeout))

    def stub(self, peer_id: str):
        return TransformerConnectionHandler.get_stub(self.p2p, PeerID.from_base58(peer_id))

    def info(self, peer_id: str, uid: str = "") -> dict:
        async def call():
            response = await self.stub(peer_id).rpc_info(runtime_pb2.ExpertUID(uid=uid), timeout=30)
            return MSGPackSerializer.loads(response.serialized_info)

        return self.run(call())

    def forward(self, peer_id: str, uid: str, hidden: torch.Tensor) -> torch.Tensor:
        async def call():
            request = runtime_pb2.ExpertRequest(
                uid=uid,
                tensors=[serialize_torch_tensor(hidden), serialize_torch_tensor(DUMMY)],
                metadata=MSGPackSerializer.dumps({"args_structure": ((b"__T0", b"__T1"), {})}),
            )
            response = await self.stub(peer_id).rpc_forward(request, timeout=60)
            return deserialize_torch_tensor(response.tensors[0])

        return self.run(call())

    def session(
        self,
        peer_id: str,
        requests: Sequence[runtime_pb2.ExpertRequest | float | None],
        wait_replies: bool = True,
        reply_timeout: float = 30.0,
    ) -> SessionResult:
        """Send `requests` on one rpc_inference stream (a float sleeps; None ends the stream without
        the closing empty request). With `wait_replies`, each request waits for its reply first."""
        result = SessionResult()
        replies: asyncio.Queue = asyncio.Queue()

        finished = asyncio.Event()
        closed = []  # set once the closing (empty) request went out

        async def producer():
            for item in requests:
                if item is None or finished.is_set():
                    return
                if isinstance(item, float):
                    await asyncio.sleep(item)
                    continue
                if not item.tensors:
                    closed.append(True)
                yield item
                if wait_replies and item.tensors:
                    reply = asyncio.ensure_future(replies.get())
                    done = asyncio.ensure_future(finished.wait())
                    try:
                        await asyncio.wait({reply, done}, timeout=reply_timeout, return_when=asyncio.FIRST_COMPLETED)
                    finally:  # also when hivemind cancels this writer: nothing may stay pending on the loop
                        reply.cancel()
                        done.cancel()
                        await asyncio.gather(reply, done, return_exceptions=True)

        async def call():
            try:
                stream = await self.stub(peer_id).rpc_inference(producer())
                async for response in stream:
                    result.outputs.append(deserialize_torch_tensor(response.tensors[0]))
                    replies.put_nowait(None)
            except (BrokenPipeError, ConnectionResetError) as exc:
                # After the closing request the server ends the stream at once, and hivemind's writer
                # may still be sending its end-of-stream marker: a clean close, not an error.
                if not closed:
                    result.error = str(exc)
            except Exception as exc:  # error replies arrive as exceptions
                result.error = str(exc)
            finally:
                # Let the stream's writer see the end now, not in the next call on this loop.
                finished.set()
                await asyncio.sleep(0.1)

        self.run(call(), timeout=120)
        return result


def new_ids() -> dict:
    return {"session_id": str(uuid.uuid4()), "step_id": str(uuid.uuid4())}
