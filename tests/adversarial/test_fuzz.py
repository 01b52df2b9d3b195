"""A seeded fuzzer over every RPC of the block server and over the DHT record reader.

In process, each RPC of the real handler (real tiny model, real cache budget, real compute thread)
gets COROLLA_FUZZ_CASES hostile requests: 10,000 by default, in CI (about 30 s for all seven RPCs on a
loaded two-core machine). Over the wire, a real `corolla serve` gets COROLLA_FUZZ_WIRE_CASES per RPC
(default 200) through p2pd, raw framing included. The DHT record reader gets COROLLA_FUZZ_DHT_RECORDS
block records (default 10,000, each of up to 40 entries). A crash, a hang (a request not answered
within HANG_S), an exception other than a refusal, or a cache budget not back to full afterwards is a
failure. COROLLA_FUZZ_SEED changes the seed (fixed by default).
"""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hivemind.p2p import P2PContext, PeerID
from hivemind.utils.timed_storage import ValueWithExpiration

from corolla.swarm import protocol
from corolla.swarm.client.routing import MissingBlocksError, choose_route
from corolla.swarm.dht_records import MAX_SERVERS_PER_BLOCK, compute_spans, read_module_info
from corolla.swarm.models.errors import EngineError
from corolla.swarm.server.handler import HandlerLimits, TransformerConnectionHandler
from corolla.swarm.server.memory_cache import AllocationError, CacheBudget
from corolla.swarm.server.packing import BadRequest
from corolla.swarm.server.stats import ServerStats
from corolla.swarm.server.streams import TURNED_AWAY
from tests.adversarial.conftest import BLOCKS, HIDDEN, PREFIX
from tests.adversarial.fuzz_cases import RecordFuzzer, RequestFuzzer

CASES = int(os.environ.get("COROLLA_FUZZ_CASES", "10000"))
DHT_RECORDS = int(os.environ.get("COROLLA_FUZZ_DHT_RECORDS", "10000"))
WIRE_CASES = int(os.environ.get("COROLLA_FUZZ_WIRE_CASES", "200"))
SEED = int(os.environ.get("COROLLA_FUZZ_SEED", "20261129"))
HANG_S = 10.0
REFILL_WAIT_S = 0.25  # a peer turned away for too many refusals earns a few back in this while
WIRE_STREAMS_AT_ONCE = 4
REFUSALS = (BadRequest, AllocationError, EngineError, TimeoutError, protocol.DecodeError)
UNARY = ["rpc_info", "rpc_forward", "rpc_backward", "rpc_push"]
STREAMING = ["rpc_forward_stream", "rpc_backward_stream", "rpc_inference"]
FUZZ_BLOCKS = 2  # the in-process handler's span
PEERS = [PeerID(bytes([0, 36, 8, 1, 18, 32]) + bytes([i]) * 32) for i in range(3)]


@pytest.fixture(scope="module")
def handler(local_span):
    # Two blocks are enough for every check a request meets (chains, shapes, positions, the cache),
    # and a third of six blocks' compute; one compute thread as a served span has, and one intra-op
    # thread as the servers the tests start (on a busy two-core machine more threads only spin).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    executor = ThreadPoolExecutor(max_workers=1)
    bytes_per_token_block = 2 * HIDDEN * 4
    budget = CacheBudget(FUZZ_BLOCKS * 64 * bytes_per_token_block, bytes_per_token_block, max_alloc_timeout=0.2)
    limits = HandlerLimits(
        inference_max_length=64,
        max_batch_size=256,
        max_open_sessions=8,
        request_timeout=5.0,
        session_timeout=10.0,
        step_timeout=1.0,
        refusal_burst=None,  # what is fuzzed is behind the door that turns a peer of many refusals away
    )
    span = local_span.sub(0, FUZZ_BLOCKS)
    yield TransformerConnectionHandler(span, PREFIX, budget, limits, ServerStats(), executor)
    executor.shutdown(wait=True)
    torch.set_num_threads(threads)


async def _messages(requests):
    for request in requests:
        yield request


async def _call(handler: TransformerConnectionHandler, rpc: str, case, peer: PeerID) -> None:
    context = P2PContext(handle_name=rpc, local_id=PEERS[0], remote_id=peer)
    method = getattr(handler, rpc)
    if rpc in UNARY:
        await method(case, context)
    else:
        async for _ in method(_messages(case), context):
            pass


@pytest.mark.slow
@pytest.mark.parametrize("rpc", UNARY + STREAMING)
# hivemind reads a uniform-8bit tensor's statistics through a read-only view of the message (only
# read, never written); 10,000 random messages reach that path, which torch warns about once.
@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_fuzz_every_rpc_in_process(rpc, handler):
    fuzzer = RequestFuzzer(SEED + zlib.crc32(rpc.encode()) % 1000, PREFIX, FUZZ_BLOCKS, HIDDEN)
    make = {"rpc_info": fuzzer.info_request, "rpc_forward": fuzzer.request, "rpc_backward": fuzzer.backward_request}
    make |= {"rpc_push": fuzzer.request}
    make |= {name: fuzzer.stream for name in STREAMING}
    unexpected: list[str] = []
    hangs: list[int] = []
    outcomes = {"answered": 0, "refused": 0}

    async def run_all() -> None:
        for index in range(CASES):
            case = make[rpc]()
            try:
                async with asyncio.timeout(HANG_S) as deadline:
                    await _call(handler, rpc, case, PEERS[index % len(PEERS)])
                outcomes["answered"] += 1
            except REFUSALS:
                if deadline.expired():
                    hangs.append(index)
                else:
                    outcomes["refused"] += 1
            except Exception as exc:
                unexpected.append(f"case {index}: {type(exc).__name__}: {protocol.shorten(str(exc), 200)}")

    asyncio.run(run_all())
    print(f"{rpc}: {outcomes}")
    assert not hangs, f"{len(hangs)} hangs, first cases {hangs[:5]}"
    assert not unexpected, f"{len(unexpected)} unexpected errors:\n" + "\n".join(unexpected[:10])
    assert outcomes["answered"] + outcomes["refused"] == CASES
    # nothing left behind: every session closed, every slot and the whole cache budget free
    assert handler.budget.bytes_left == handler.budget.max_bytes
    assert not handler.sessions and not handler.load.sessions and not handler.load.queued


@pytest.mark.slow
@pytest.mark.parametrize("rpc", UNARY + STREAMING)
def test_fuzz_every_rpc_over_the_wire(rpc, hostile, server, check, resources):
    """Each case really reaches the handler: one the server turned away at the door (the hostile peer
    ran out of refusals) is sent again once its budget has refilled a little."""
    fuzzer = RequestFuzzer(SEED + 7 + zlib.crc32(rpc.encode()) % 1000, PREFIX, BLOCKS, HIDDEN)
    deadline = time.monotonic() + 30 + WIRE_CASES * 2  # hang guard for the whole run
    turned_away = 0
    if rpc in UNARY:
        for _ in range(WIRE_CASES):
            request = fuzzer.info_request() if rpc == "rpc_info" else fuzzer.request()
            while True:
                assert time.monotonic() < deadline, "the server stopped answering fuzzed requests in time"
                if TURNED_AWAY not in str(hostile.unary(server.peer_id, rpc, request, timeout=HANG_S)):
                    break
                turned_away += 1
                time.sleep(REFILL_WAIT_S)
    else:
        # A stream is read for 0.3 s whatever the server does with it: WIRE_STREAMS_AT_ONCE of them at a
        # time (within the per-peer caps on queued work and sessions), the same cases in the same order.
        for start in range(0, WIRE_CASES, WIRE_STREAMS_AT_ONCE):
            batch = [fuzzer.raw_frames() for _ in range(min(WIRE_STREAMS_AT_ONCE, WIRE_CASES - start))]
            while batch:
                assert time.monotonic() < deadline, "the server stopped answering fuzzed requests in time"
                replies = hostile.raw_streams(server.peer_id, rpc, batch, read_for=0.3)
                batch = [case for case, reply in zip(batch, replies, strict=True) if TURNED_AWAY.encode() in reply]
                turned_away += len(batch)
                if batch:
                    time.sleep(REFILL_WAIT_S)
    print(f"{rpc}: {WIRE_CASES} cases, {turned_away} sent again after being turned away")
    assert server.process.poll() is None, server.log_tail()
    check.all_well()
    assert resources.growth_mib() < 64


# --- the DHT record reader -----------------------------------------------------------------------


@pytest.mark.slow
def test_fuzz_the_dht_record_reader():
    """DHT_RECORDS block records as peers could store them (server infos with hostile numbers, types
    and texts, then byte mutations and deep nesting spliced in) through the bounded decoder into the
    reader, the span computation and the router: never an error other than a refusal to decode, and
    every result within bounds."""
    fuzzer = RecordFuzzer(SEED, PREFIX, BLOCKS, HIDDEN)
    decoded = refused = 0
    for _ in range(DHT_RECORDS // BLOCKS):
        infos = []
        for index in range(BLOCKS):
            entries = {}
            for subkey, raw in fuzzer.record().items():
                try:
                    entries[subkey] = ValueWithExpiration(protocol.loads(raw, protocol.MAX_DHT_MSGPACK_BYTES), 1e12)
                    decoded += 1
                except protocol.DecodeError:
                    refused += 1
            infos.append(read_module_info(protocol.make_uid(PREFIX, index), ValueWithExpiration(entries, 1e12)))
        spans = compute_spans(infos, protocol.ServerState.ONLINE)
        assert all(len(module.servers) <= MAX_SERVERS_PER_BLOCK for module in infos)
        for span in spans.values():
            assert 0 <= span.start < span.end <= BLOCKS
            assert span.server_info.throughput <= protocol.MAX_ANNOUNCED_RPS
            assert span.server_info.inference_rps is None or span.server_info.inference_rps <= 1e6
        try:
            route = choose_route(spans, 0, BLOCKS, {})
            assert route[0].start == 0 and route[-1].end == BLOCKS
        except MissingBlocksError:
            pass
    print(f"DHT records: {decoded} entries decoded, {refused} refused")
    assert decoded > refused  # the generator reaches the reader, not only the decoder
