"""Attacks on the swarm client: forged and flooded DHT records, and a server that never lets a
session close. The client keeps generating token-exact through the honest server, and never hangs."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

import corolla
from corolla.swarm import protocol
from corolla.swarm.client.session import InferenceSession
from corolla.swarm.client.streams import CLOSE_TIMEOUT
from corolla.swarm.dht_records import MAX_SERVERS_PER_BLOCK, compute_spans, declare_blocks, get_module_infos
from corolla.swarm.peers import start_dht
from corolla.swarm.protocol import ServerInfo, ServerState
from corolla.swarm.server.handler import TransformerConnectionHandler
from corolla.testing.hostile import deep_tuples
from tests.adversarial.conftest import BLOCKS, HIDDEN, PREFIX

CLIENT_OPTIONS = {"use_relay": False, "auto_nat": False, "request_timeout": 10.0, "max_retries": 3, "min_backoff": 0.2}
TRAP_PREFIX = "tiny-trap"


def fake_peer_id() -> str:
    """A well-formed Ed25519 peer id that no process answers to."""
    return PeerID(b"\x00\x24\x08\x01\x12\x20" + os.urandom(32)).to_base58()


def forged_record(start: int = 0, end: int = 10**9, name: str = "x" * 10_000) -> tuple:
    return ServerInfo(
        state=ServerState.ONLINE,
        throughput=1e300,
        start_block=start,
        end_block=end,
        inference_rps=1e300,
        forward_rps=1e300,
        network_rps=1e300,
        cache_tokens_left=2**62,
        public_name=name,
    ).to_tuple()


@pytest.fixture(scope="module")
def remote(model_dir, server):
    model = corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers=[server.maddr], dht_prefix=PREFIX, **CLIENT_OPTIONS
    )
    yield model
    model.close()


def greedy_matches_local(remote, local, seed: int = 0) -> None:
    ids = torch.randint(6, 500, (1, 6), generator=torch.Generator().manual_seed(seed))
    got = remote.generate(ids, max_new_tokens=6, do_sample=False)
    want = local.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_one_forged_record_does_not_take_the_route(hostile, remote, local, server):
    forger = fake_peer_id()
    hostile.store_records(server.peer_id, [protocol.make_uid(PREFIX, 0)], {forger: forged_record()})
    uids = [protocol.make_uid(PREFIX, i) for i in range(BLOCKS)]
    infos = hostile.run(get_module_infos(hostile.dht, uids))
    assert forger in infos[0].servers  # the record is there for everyone to read...
    spans = compute_spans(infos, ServerState.ONLINE)
    # ...but gives its peer the one block it announced under, with its numbers clamped
    assert (spans[forger].start, spans[forger].end) == (0, 1)
    assert spans[forger].server_info.inference_rps == protocol.MAX_ANNOUNCED_RPS
    assert len(spans[forger].server_info.public_name) <= protocol.MAX_LOGGED_CHARS
    remote._loop.run(remote.view.refresh())
    route = remote.view.route(0, BLOCKS)
    assert [segment.peer_id for segment in route] == [server.peer_id]
    greedy_matches_local(remote, local)


def test_a_flood_of_fake_servers_is_sampled_and_routed_around(hostile, remote, local, server):
    flood = {fake_peer_id(): forged_record(i % BLOCKS, i % BLOCKS + 1, name="") for i in range(600)}
    hostile.store_records(server.peer_id, [protocol.make_uid(PREFIX, i) for i in range(BLOCKS)], flood)
    remote._loop.run(remote.view.refresh(), timeout=120)
    covering = [sum(s.start <= b < s.end for s in remote.view.spans.values()) for b in range(BLOCKS)]
    assert max(covering) <= MAX_SERVERS_PER_BLOCK + 1
    assert server.peer_id in remote.view.spans
    greedy_matches_local(remote, local, seed=1)


class TrapServer:
    """A hostile 'server' that answers each step with its input and never ends a session."""

    def __init__(self, initial_peer: str):
        self.dht = start_dht([initial_peer], use_relay=False, auto_nat=False, in_process=True)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.p2p = self.run(self.dht.replicate_p2p())
        self.peer_id = self.dht.peer_id.to_base58()
        self.run(self._register())
        uids = [protocol.make_uid(TRAP_PREFIX, i) for i in range(BLOCKS)]
        info = ServerInfo(ServerState.ONLINE, 10.0, start_block=0, end_block=BLOCKS, cache_tokens_left=10**6)
        self.run(declare_blocks(self.dht, uids, info, 300))

    def run(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _register(self) -> None:
        async def rpc_info(request, context):
            return runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps({"version": "trap"}))

        async def rpc_inference(requests, context):
            async for request in requests:
                if request.tensors:
                    yield runtime_pb2.ExpertResponse(tensors=[request.tensors[0]])
                else:
                    await asyncio.sleep(3600)  # the closing request: never answer, never close

        name = TransformerConnectionHandler._get_handle_name
        await self.p2p.add_protobuf_handler(name(None, "rpc_info"), rpc_info, runtime_pb2.ExpertUID)
        await self.p2p.add_protobuf_handler(
            name(None, "rpc_inference"),
            rpc_inference,
            runtime_pb2.ExpertRequest,
            stream_input=True,
            stream_output=True,
        )

    def close(self) -> None:
        self.run(self.p2p.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.dht.shutdown()


def test_a_server_that_never_closes_cannot_hold_the_client(model_dir, server):
    trap = TrapServer(server.maddr)
    model = corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers=[server.maddr], dht_prefix=TRAP_PREFIX, **CLIENT_OPTIONS
    )
    try:
        session = InferenceSession(model.view, max_length=8)
        hidden = torch.randn(1, 2, HIDDEN)
        out = model._loop.run(session.step(hidden), timeout=60)
        assert torch.equal(out, hidden) and session.route[0].peer_id == trap.peer_id
        # bounded: the close gives up on the silent server after CLOSE_TIMEOUT (plus the stream's own close)
        model._loop.run(session.close(), timeout=4 * CLOSE_TIMEOUT + 10)
    finally:
        model.close()
        trap.close()


def test_a_poisoned_entry_does_not_hide_the_rest_of_a_record():
    """hivemind's lookup decodes every entry of a found record and fails the whole key on the first
    that does not decode; Corolla's DHT processes skip that entry and keep the others."""
    from hivemind.dht.node import _SearchState
    from hivemind.dht.routing import DHTID
    from hivemind.dht.storage import DictionaryDHTValue

    async def lookup():
        record = DictionaryDHTValue()
        record.store("honest", MSGPackSerializer.dumps(forged_record(0, 1, name="")), 1e12)
        record.store("poison", deep_tuples(400), 1e12)
        received = MSGPackSerializer.loads(MSGPackSerializer.dumps(record))  # as it arrives from a peer
        search = _SearchState(DHTID.generate(source="key"), float("inf"))
        search.binary_value, search.expiration_time = received, 1e12
        search.finish_search()
        return await search.future

    found = asyncio.run(lookup())
    assert set(found.value) == {"honest"}


POISONS = {  # name: (count, value), or (count, size) for values built in the hostile peer's DHT process
    "malformed": (1, b"\xc1\xc1\xc1"),  # 0xc1 is never valid msgpack
    "over-nested": (1, deep_tuples(400)),
    "oversized": (5, 1024 * 1024),  # together over p2pd's 4 MiB message cap
    "flooded": (140, protocol.MAX_DHT_VALUE_BYTES - 16),  # each under the value cap, together over 4 MiB
}


@pytest.mark.parametrize("poison", list(POISONS))
def test_a_poisoned_key_read_over_the_network_keeps_its_honest_servers(hostile, accomplice, honest, server, poison):
    """A hostile peer stores bad values under a model's block key in a server's DHT; an honest reader
    (another process, asking over the network) still sees the honest server stored under that key.
    (Each used to make the whole key read empty: the undecodable entry failed the lookup, and a key
    grown past p2pd's message cap failed every reply that carried it.)"""
    uid = protocol.make_uid(f"poisoned-{poison}", 0)
    honest_peer = fake_peer_id()
    accomplice.store_records(server.peer_id, [uid], {honest_peer: forged_record(0, 1, name="")})
    count, value = POISONS[poison]
    if isinstance(value, bytes):
        hostile.store_raw(server.peer_id, uid, MSGPackSerializer.dumps(fake_peer_id()), value)
    else:
        hostile.store_filler(server.peer_id, uid, count, value)
    (info,) = honest.run(get_module_infos(honest.dht, [uid]))
    assert set(info.servers) == {honest_peer}
    assert server.process.poll() is None
