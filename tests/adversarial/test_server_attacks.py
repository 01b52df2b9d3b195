"""Each attack of issue 10 against a real block server, from a hostile peer: the server stays up,
answers an honest peer token-exact, gets its whole cache budget back, and grows by < 64 MiB."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from corolla.swarm import protocol
from corolla.testing.hostile import (
    deep_dictionary,
    deep_metadata,
    deep_tuples,
    frame,
    group_members,
    inference_request,
    is_dictionary_tag,
)
from corolla.testing.wire import new_ids, step_request
from tests.adversarial.conftest import CHAIN, HIDDEN, MAX_OPEN_SESSIONS, PREFIX

MAX_RSS_GROWTH_MIB = 64
UNARY = ["rpc_forward", "rpc_backward", "rpc_push"]
STREAMING = ["rpc_inference", "rpc_forward_stream", "rpc_backward_stream"]


def in_background(fn, *args) -> threading.Thread:
    thread = threading.Thread(target=fn, args=args, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("rpc", UNARY)
def test_deeply_nested_metadata_on_unary_rpcs(rpc, hostile, server, check, resources):
    reply = hostile.unary(server.peer_id, rpc, inference_request(CHAIN, deep_metadata()))
    assert "nested" in str(reply), reply
    check.all_well()
    assert resources.growth_mib() < MAX_RSS_GROWTH_MIB


@pytest.mark.parametrize("rpc", STREAMING)
def test_deeply_nested_metadata_on_streams(rpc, hostile, server, check, resources):
    request = inference_request(CHAIN, deep_metadata(), [serialize_torch_tensor(torch.randn(1, 2, HIDDEN))])
    reply = hostile.raw_stream(server.peer_id, rpc, frame(request.SerializeToString()))
    assert b"nested" in reply, reply[:300]
    check.all_well()


def test_deeply_nested_values_sent_to_the_servers_dht(hostile, server, check):
    """The DHT process decodes values peers ask it to store: a deep one must not kill it."""
    members = {p.pid for p in group_members(server.process.pid)}
    uid = protocol.make_uid(PREFIX, 0)
    hostile.store_raw(server.peer_id, uid, is_dictionary_tag(), deep_dictionary())
    hostile.store_raw(server.peer_id, uid, deep_tuples(400), b"\xc0")  # the subkey is decoded too
    assert {p.pid for p in group_members(server.process.pid)} == members  # DHT child and p2pd alive
    check.all_well()
    # and the DHT still answers: the server's own record is readable
    record = hostile.dht.get(protocol.make_uid(PREFIX, 1), latest=True)
    assert record is not None and server.peer_id in record.value


def test_a_3_gib_length_prefix_is_refused_before_reading(hostile, server, check, resources):
    payload = frame(b"\x00" * (96 * 2**20), claimed_length=3 * 2**30)
    reply = hostile.raw_stream(server.peer_id, "rpc_inference", payload)
    # The refusal reaches the caller unless p2pd's reset of the 96 MiB it is still writing overtakes it.
    assert b"over this server's limit" in reply or "over this server's limit" in server.log_tail(50)
    assert resources.growth_mib() < MAX_RSS_GROWTH_MIB
    check.all_well()


def test_many_large_messages_at_once_stay_within_the_receive_budget(hostile, server, check, resources):
    limit = 4 * 2**20  # the tiny model's largest honest message is one 4 MiB forward-stream chunk
    payloads = [frame(b"\x0a" + b"\x00" * (limit - 1))] * 24
    hostile.open_streams(server.peer_id, "rpc_forward_stream", payloads, hold_s=3.0)
    assert resources.growth_mib() < MAX_RSS_GROWTH_MIB
    check.all_well()


def test_a_stream_that_never_ends_is_cut_off(hostile, server, check):
    """A forward stream whose last message never comes holds nothing past the request timeout, and
    the peer's other streams are capped meanwhile."""
    first = runtime_pb2.ExpertRequest(uid=CHAIN, tensors=[serialize_torch_tensor(torch.randn(1, 2, HIDDEN))])
    replies = hostile.open_streams(server.peer_id, "rpc_forward_stream", [frame(first.SerializeToString())] * 8, 2.0)
    refused = [r for r in replies if b"in flight from one peer" in r]
    assert len(refused) >= 8 - 4, replies  # at most 4 forward/backward requests in flight per peer
    check.all_well()


def test_free_sessions_do_not_take_the_slots_of_real_ones(hostile, server, check):
    """max_length=0 reserves no cache; such sessions once filled every slot (here 4)."""
    zero = step_request(CHAIN, torch.randn(1, 0, HIDDEN), max_length=0, **new_ids())
    payloads = []
    for _ in range(MAX_OPEN_SESSIONS * 2):
        zero.metadata = MSGPackSerializer.dumps({**MSGPackSerializer.loads(zero.metadata), **new_ids()})
        payloads.append(frame(zero.SerializeToString()))
    attack = in_background(hostile.open_streams, server.peer_id, "rpc_inference", payloads, 6.0)
    try:
        check.session_matches_local(seed=1)
    finally:
        attack.join(60)
    check.all_well()


def test_one_peer_cannot_hold_more_than_its_share_of_sessions(hostile, server, check):
    replies: list[bytes] = []

    def attack():
        payloads = [
            frame(step_request(CHAIN, torch.randn(1, 0, HIDDEN), max_length=0, **new_ids()).SerializeToString())
            for _ in range(40)
        ]
        replies.extend(hostile.open_streams(server.peer_id, "rpc_inference", payloads, 6.0))

    thread = in_background(attack)
    try:
        check.session_matches_local(seed=2)
    finally:
        thread.join(60)
    assert sum(b"too many open sessions from one peer" in r for r in replies) == 40 - 32
    check.all_well()


def test_forward_flood_does_not_starve_token_steps(hostile, server, check):
    request = runtime_pb2.ExpertRequest(
        uid=CHAIN,
        tensors=[serialize_torch_tensor(torch.randn(1, 256, HIDDEN))],
        metadata=MSGPackSerializer.dumps({}),
    )
    payloads = [frame(request.SerializeToString()) + frame(b"", marker=b"\x01")] * 12
    thread = in_background(hostile.open_streams, server.peer_id, "rpc_forward_stream", payloads, 5.0)
    try:
        for seed in range(3):
            check.session_matches_local(seed=seed)
    finally:
        thread.join(60)
    check.all_well()


def test_pushes_only_reach_open_sessions_from_their_one_pusher(hostile, accomplice, honest, server, check):
    step = torch.randn(1, 1, HIDDEN)
    unknown = step_request(CHAIN, step, session_id="no-such-session", step_id="x")
    assert "no open session" in str(hostile.unary(server.peer_id, "rpc_push", unknown))

    ids = new_ids()
    opening = step_request(CHAIN, torch.randn(1, 2, HIDDEN), max_length=8, **ids)
    thread = in_background(
        hostile.open_streams, server.peer_id, "rpc_inference", [frame(opening.SerializeToString())], 4.0
    )
    try:
        sid = ids["session_id"]
        wrong_blocks = step_request(protocol.chain_uids(PREFIX, 0, 2), step, session_id=sid, step_id="p0")
        deadline = time.monotonic() + 20
        while "no open session" in (reply := str(accomplice.unary(server.peer_id, "rpc_push", wrong_blocks))):
            assert time.monotonic() < deadline, "the hostile session never opened"
            time.sleep(0.1)
        assert "not the session's" in reply
        first = accomplice.unary(server.peer_id, "rpc_push", step_request(CHAIN, step, session_id=sid, step_id="p1"))
        assert isinstance(first, runtime_pb2.ExpertResponse), first
        other = honest_push(honest, server.peer_id, step_request(CHAIN, step, session_id=sid, step_id="p2"))
        assert "another peer pushes" in other
    finally:
        thread.join(60)
    check.all_well()


def honest_push(client, peer_id, request) -> str:
    async def call():
        try:
            await client.stub(peer_id).rpc_push(request, timeout=10)
            return "accepted"
        except Exception as exc:
            return str(exc)

    return client.run(call())


def test_huge_uids_are_not_echoed_whole(hostile, server, check):
    size_before = server.log_path.stat().st_size
    uid = "x" * (1024 * 1024)
    reply = hostile.unary(server.peer_id, "rpc_forward", runtime_pb2.ExpertRequest(uid=uid))
    assert "does not serve" in str(reply) and len(str(reply)) < 1000
    info_reply = hostile.unary(server.peer_id, "rpc_info", runtime_pb2.ExpertUID(uid=uid))
    assert len(str(info_reply)) < 1000
    request = runtime_pb2.ExpertRequest(uid=uid, tensors=[serialize_torch_tensor(torch.randn(1, 1, HIDDEN))])
    stream_reply = hostile.raw_stream(server.peer_id, "rpc_inference", frame(request.SerializeToString()))
    assert b"does not serve" in stream_reply and len(stream_reply) < 1000
    assert server.log_path.stat().st_size - size_before < 20_000
    check.all_well()
