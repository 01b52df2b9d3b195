"""A hostile peer on the push stream between Corolla servers (server/push_stream.py): its messages meet
rpc_push's checks, its oversized messages and extra streams are refused, a flood ends with the peer
turned away, and the server goes on answering an honest peer token-exact."""

from __future__ import annotations

import asyncio
import threading
import time

import torch
from hivemind.p2p import PeerID

from corolla.swarm import protocol
from corolla.swarm.server import push_stream
from corolla.testing.hostile import HostilePeer, frame
from corolla.testing.wire import new_ids, step_request
from tests.adversarial.conftest import CHAIN, HIDDEN, PREFIX

MAX_RSS_GROWTH_MIB = 64


def on_push_stream(peer: HostilePeer, server_peer_id: str, payload: bytes, read_for: float = 2.0) -> bytes:
    """Open a push stream, write `payload`, and return what comes back within `read_for` seconds."""

    async def call() -> bytes:
        _, reader, writer = await peer.p2p.call_binary_stream_handler(
            PeerID.from_base58(server_peer_id), protocol.PUSH_STREAM_NAME
        )
        return await HostilePeer._exchange(reader, writer, payload, read_for)

    return peer.run(call(), timeout=read_for + 30)


def push(request) -> bytes:
    return frame(request.SerializeToString())


def stats_after(server, key: str, at_least: int, within_s: float = 10.0) -> dict:
    """The server's stats once `key` reached `at_least` (its stats file is rewritten every second)."""
    deadline = time.monotonic() + within_s
    while (stats := server.stats())[key] < at_least and time.monotonic() < deadline:
        time.sleep(0.3)
    return stats


def test_pushes_on_the_stream_meet_rpc_push_checks(hostile, accomplice, server, check):
    """Unknown session, the wrong blocks, another peer's session: each refused and counted, the stream
    left open (no answer); the one peer that pushes to a session gets its step taken."""
    step = torch.randn(1, 1, HIDDEN)
    before = server.stats()
    unknown = step_request(CHAIN, step, session_id="no-such-session", step_id="x")
    assert on_push_stream(hostile, server.peer_id, push(unknown)) == b""  # refused, and the stream goes on
    stats = stats_after(server, "requests_refused", before["requests_refused"] + 1)
    assert stats["requests_refused"] > before["requests_refused"]

    ids = new_ids()
    opening = step_request(CHAIN, torch.randn(1, 2, HIDDEN), max_length=8, **ids)
    opened = threading.Thread(
        target=hostile.open_streams,
        args=(server.peer_id, "rpc_inference", [frame(opening.SerializeToString())], 6.0),
        daemon=True,
    )
    opened.start()
    try:
        sid = ids["session_id"]
        deadline = time.monotonic() + 20
        while server.stats()["sessions_active"] < 1:  # the hostile session is open
            assert time.monotonic() < deadline, "the hostile session never opened"
            time.sleep(0.2)
        before = server.stats()
        wrong_blocks = step_request(protocol.chain_uids(PREFIX, 0, 2), step, session_id=sid, step_id="p0")
        first = step_request(CHAIN, step, session_id=sid, step_id="p1")
        assert on_push_stream(accomplice, server.peer_id, push(wrong_blocks) + push(first)) == b""
        stats = stats_after(server, "pushes_received_on_stream", before["pushes_received_on_stream"] + 1)
        assert stats["pushes_received_on_stream"] == before["pushes_received_on_stream"] + 1  # `first` only
        assert stats["requests_refused"] >= before["requests_refused"] + 1  # the wrong blocks
        # The session's pusher is the accomplice now: another peer's push on its own stream is refused.
        other = step_request(CHAIN, step, session_id=sid, step_id="p2")
        with HostilePeer(server.maddr) as stranger:
            assert on_push_stream(stranger, server.peer_id, push(other)) == b""
        stats = stats_after(server, "requests_refused", stats["requests_refused"] + 1)
        assert stats["pushes_received_on_stream"] == before["pushes_received_on_stream"] + 1
    finally:
        opened.join(60)
    check.all_well()


def test_an_oversized_push_message_ends_the_stream_before_its_body_is_read(hostile, server, check, resources):
    payload = frame(b"\x00" * (4 * 2**20), claimed_length=64 * 2**20)
    reply = on_push_stream(hostile, server.peer_id, payload, read_for=5.0)
    assert b"over this server's limit" in reply or "over this server's limit" in server.log_tail(50)
    assert resources.growth_mib() < MAX_RSS_GROWTH_MIB
    check.all_well()


def test_a_peer_holds_at_most_three_push_streams(server, check):
    """STREAMS_PER_PEER: one in use, one ending after a move to a direct link, one reopening."""
    with HostilePeer(server.maddr) as peer:

        async def many() -> list[bytes]:
            async def one() -> bytes:
                _, reader, writer = await peer.p2p.call_binary_stream_handler(
                    PeerID.from_base58(server.peer_id), protocol.PUSH_STREAM_NAME
                )
                return await HostilePeer._exchange(reader, writer, b"", 3.0)

            return await asyncio.gather(*(one() for _ in range(7)))

        replies = peer.run(many(), timeout=60)
    allowed = push_stream.STREAMS_PER_PEER
    refused = [r for r in replies if b"too many open streams" in r]
    assert len(refused) >= 7 - allowed and replies.count(b"") <= allowed, replies
    check.all_well()


def test_a_flood_of_refused_pushes_on_one_stream_ends_with_the_peer_turned_away(server, check, resources):
    """Thousands of pushes into no session on one stream: read at the pace they are refused, each
    charged, until the peer is out of refusals and its stream is ended."""
    step = torch.randn(1, 1, HIDDEN)
    flood = b"".join(push(step_request(CHAIN, step, session_id=f"none-{i}", step_id="x")) for i in range(3000))
    before = server.stats()
    with HostilePeer(server.maddr) as peer:
        reply = on_push_stream(peer, server.peer_id, flood, read_for=10.0)
    assert b"try again in a few seconds" in reply, reply[-300:]
    stats = server.stats()
    assert stats["pushes_received"] == before["pushes_received"]
    assert resources.growth_mib() < MAX_RSS_GROWTH_MIB
    check.all_well()
