"""A hostile swarm peer built from hivemind's own client pieces: a client-mode DHT, its p2pd, raw
libp2p streams and the DHT's store RPC. It sends what an honest peer never would."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from functools import partial

import msgpack
import psutil
from hivemind.dht import DHT, DHTNode
from hivemind.dht.routing import DHTID
from hivemind.p2p import PeerID
from hivemind.proto import dht_pb2, runtime_pb2
from hivemind.utils import MSGPackSerializer, get_dht_time

from corolla.swarm.server.handler import TransformerConnectionHandler
from corolla.testing.wire import WireClient

TUPLE_EXT = 0x40
DICTIONARY_EXT = 0x50


def deep_tuples(depth: int, leaf: bytes | None = None) -> bytes:
    """msgpack of a tuple nested `depth` levels deep, as hivemind encodes tuples (ext 0x40): ~5 bytes
    a level, so 200 levels are ~1 KB, far under any size cap."""
    packed = leaf if leaf is not None else msgpack.packb([])
    for _ in range(depth):
        packed = msgpack.packb(msgpack.ExtType(TUPLE_EXT, msgpack.packb([msgpack.ExtType(TUPLE_EXT, packed)])))
    return packed


def deep_metadata(depth: int = 400) -> bytes:
    """A metadata map whose args_structure is nested `depth` tuples deep (~2 KB for 400)."""
    return msgpack.packb({"args_structure": msgpack.ExtType(TUPLE_EXT, deep_tuples(depth)), "max_length": 8})


def frame(body: bytes, marker: bytes = b"\x00", claimed_length: int | None = None) -> bytes:
    """One message of hivemind's stream framing: marker, 8-byte big-endian length, body."""
    length = len(body) if claimed_length is None else claimed_length
    return marker + length.to_bytes(8, "big") + body


def handle_name(rpc: str) -> str:
    return TransformerConnectionHandler._get_handle_name(None, rpc)


class HostilePeer(WireClient):
    """A WireClient that can also write raw bytes on a stream and store raw bytes in the DHT."""

    async def _open(self, peer_id: str, rpc: str):
        _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), handle_name(rpc))
        return reader, writer

    @staticmethod
    async def _exchange(reader, writer, payload: bytes, read_for: float) -> bytes:
        """Write `payload` on an open stream and return what comes back within `read_for` seconds
        (until the server closes its side)."""
        received = b""
        try:
            writer.write(payload)
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()
            with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
                async with asyncio.timeout(read_for):
                    while chunk := await reader.read(65536):
                        received += chunk
        finally:
            writer.close()
        return received

    def raw_stream(self, peer_id: str, rpc: str, payload: bytes, read_for: float = 5.0) -> bytes:
        """Open a stream to `rpc`, write `payload`, and return what comes back within `read_for`
        seconds (until the server closes its side)."""

        async def call() -> bytes:
            return await self._exchange(*await self._open(peer_id, rpc), payload, read_for)

        return self.run(call(), timeout=read_for + 30)

    def raw_streams(self, peer_id: str, rpc: str, payloads: list[bytes], read_for: float = 5.0) -> list[bytes]:
        """raw_stream for each payload, all at once: what came back on each within `read_for` seconds
        (a stream that cannot be opened fails the call, as in raw_stream)."""

        async def call() -> list[bytes]:
            async def one(payload: bytes) -> bytes:
                return await self._exchange(*await self._open(peer_id, rpc), payload, read_for)

            return await asyncio.gather(*(one(p) for p in payloads))

        return self.run(call(), timeout=read_for + 30)

    def open_streams(self, peer_id: str, rpc: str, payloads: list[bytes], hold_s: float) -> list[bytes]:
        """Many streams at once, each sent its payload and held open for `hold_s` seconds."""

        async def one(payload: bytes) -> bytes:
            try:
                stream = await self._open(peer_id, rpc)
            except Exception as exc:
                return repr(exc).encode()
            return await self._exchange(*stream, payload, hold_s)

        async def all_of_them() -> list[bytes]:
            return await asyncio.gather(*(one(p) for p in payloads))

        return self.run(all_of_them(), timeout=hold_s + 60)

    def unary(self, peer_id: str, rpc: str, request, timeout: float = 30.0):
        """Call a unary RPC; returns the response or the error text."""

        async def call():
            try:
                return await getattr(self.stub(peer_id), rpc)(request, timeout=timeout)
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"

        return self.run(call(), timeout=timeout + 10)

    def store_raw(self, target_peer: str, key: str, tag: bytes, value: bytes) -> None:
        """Ask `target_peer`'s DHT to store raw bytes under `key` with the raw subkey `tag` (hivemind's
        IS_DICTIONARY tag makes the receiver decode `value` as a whole dictionary)."""
        self.dht.run_coroutine(partial(_store_raw, target=target_peer, key=key, tag=tag, value=value))

    def store_filler(self, target_peer: str, key: str, count: int, size: int) -> None:
        """Store `count` values of `size` bytes under `key`, each under a subkey of its own (built in
        the DHT process: hivemind's pipe to it takes small calls only)."""
        self.dht.run_coroutine(partial(_store_filler, target=target_peer, key=key, count=count, size=size))

    def store_records(self, target_peer: str, uids: list[str], records: dict[str, tuple]) -> None:
        """Store `records` ({subkey: value}) under each of `uids` in `target_peer`'s DHT storage, in
        one store RPC per uid (what a flood of servers announcing themselves would leave there)."""
        items = list(records.items())
        for uid in uids:
            for start in range(0, len(items), 40):  # hivemind's pipe to its DHT process takes small calls only
                chunk = dict(items[start : start + 40])
                self.dht.run_coroutine(partial(_store_many, target=target_peer, uid=uid, records=chunk))


async def _store_raw(dht: DHT, node: DHTNode, target: str, key: str, tag: bytes, value: bytes) -> None:
    request = dht_pb2.StoreRequest(
        keys=[DHTID.generate(source=key).to_bytes()],
        subkeys=[tag],
        values=[value],
        expiration_time=[get_dht_time() + 60],
        in_cache=[False],
        peer=node.protocol.node_info,
    )
    with contextlib.suppress(Exception):  # the point is what happens to the receiver
        await node.protocol.get_stub(PeerID.from_base58(target)).rpc_store(request, timeout=10)


async def _store_filler(dht: DHT, node: DHTNode, target: str, key: str, count: int, size: int) -> None:
    value = MSGPackSerializer.dumps(b"x" * (size - 5))  # bin32 header: 5 bytes
    for _ in range(count):
        subkey = MSGPackSerializer.dumps(f"filler-{uuid.uuid4().hex}")
        await _store_raw(dht, node, target=target, key=key, tag=subkey, value=value)


async def _store_many(dht: DHT, node: DHTNode, target: str, uid: str, records: dict) -> None:
    subkeys = list(records)
    await node.protocol.call_store(
        PeerID.from_base58(target),
        keys=[DHTID.generate(source=uid)] * len(subkeys),
        values=[MSGPackSerializer.dumps(records[s]) for s in subkeys],
        expiration_time=get_dht_time() + 300,
        subkeys=subkeys,
    )


def is_dictionary_tag() -> bytes:
    from hivemind.dht.protocol import DHTProtocol

    return DHTProtocol.IS_DICTIONARY


def deep_dictionary(depth: int = 400) -> bytes:
    """A DictionaryDHTValue (ext 0x50) whose items hold a tuple nested `depth` levels deep."""
    inner = msgpack.packb([8, 0.0, [[b"k", msgpack.ExtType(TUPLE_EXT, deep_tuples(depth)), 1e12]]])
    return msgpack.packb(msgpack.ExtType(DICTIONARY_EXT, inner))


def inference_request(uid: str, metadata: bytes, tensors: list | None = None) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(uid=uid, metadata=metadata, tensors=tensors or [])


class Resources:
    """A server process's resident memory, and every process of its group (for leftover checks)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.process = psutil.Process(pid)
        self.baseline = self.rss()

    def rss(self) -> int:
        return self.process.memory_info().rss

    def growth_mib(self) -> float:
        return (self.rss() - self.baseline) / 2**20

    def alive(self) -> bool:
        return self.process.is_running() and self.process.status() != psutil.STATUS_ZOMBIE


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == pgid:
                members.append(process)
    return members


def wait_group_gone(pgid: int, timeout: float = 15.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in group_members(pgid) if p.status() != psutil.STATUS_ZOMBIE]
        if not left:
            return []
        time.sleep(0.2)
    return group_members(pgid)
