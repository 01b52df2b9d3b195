"""Pure parts of the server: the DHT value codec, block selection, the cache budget, request packing."""

from __future__ import annotations

import asyncio
import json
import math
import random

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.utils import MSGPackSerializer

from corolla.swarm import protocol
from corolla.swarm.dht_records import ModuleInfo, RemoteSpan, compute_spans
from corolla.swarm.protocol import ServerInfo, ServerState
from corolla.swarm.server.block_selection import (
    block_throughputs,
    choose_best_blocks,
    choose_best_start,
    should_choose_other_blocks,
)
from corolla.swarm.server.memory_cache import AllocationError, CacheBudget
from corolla.swarm.server.packing import BadRequest, decode_metadata, deserialize_tensors, unpack_args


def _info(**kwargs) -> ServerInfo:
    return ServerInfo(state=ServerState.ONLINE, throughput=1.0, **kwargs)


def test_server_info_round_trips_through_msgpack_with_exact_types():
    info = _info(
        start_block=2,
        end_block=5,
        inference_rps=3.5,
        cache_tokens_left=100,
        next_pings={"Qm": math.inf},
        torch_dtype="bfloat16",
        quant_type="nf4",
        extra={"corolla_version": "0.1.0"},
    )
    wire = MSGPackSerializer.dumps(info.to_tuple())
    assert wire[:3] == b"\xc7" + bytes([len(wire) - 3]) + b"\x40"  # a tuple: ext type 0x40
    decoded = ServerInfo.from_tuple(MSGPackSerializer.loads(wire))
    assert decoded.start_block == 2 and decoded.cache_tokens_left == 100 and decoded.inference_rps == 3.5
    assert decoded.extra == {"corolla_version": "0.1.0"}
    assert MSGPackSerializer.loads(wire)[0] == 2


@pytest.mark.parametrize(
    "value",
    [
        (2, 100, {}),  # an int throughput: pydantic.v1 strict float rejects it
        (2, math.inf, {}),
        (2, -1.0, {}),
        (7, 1.0, {}),  # unknown state
        (2, 1.0, {"start_block": 1.0}),
        (2, 1.0, {"cache_tokens_left": True}),
        (2, 1.0, {"inference_rps": 5}),
        (2, 1.0, {"next_pings": {"Qm": 1}}),
        "garbage",
    ],
)
def test_server_info_rejects_what_stock_readers_reject(value):
    with pytest.raises(ValueError):
        ServerInfo.from_tuple(value)


def test_writer_refuses_mistyped_values():
    with pytest.raises(ValueError):
        _info(start_block=1.5).to_tuple()
    with pytest.raises(ValueError):
        ServerInfo(state=ServerState.ONLINE, throughput=3).to_tuple()


def test_uids():
    assert protocol.make_uid("m-hf", 3) == "m-hf.3"
    assert protocol.parse_uid("bigscience/bloom-petals.12") == ("bigscience/bloom-petals", 12)
    assert protocol.chain_uids("m", 1, 4) == "m.1 m.2 m.3"
    for bad in ("m", "m.x", ".3", "a.b.3"):
        with pytest.raises(ValueError):
            protocol.parse_uid(bad)


def _span(peer, start, end, throughput=1.0, state=ServerState.ONLINE):
    return RemoteSpan(peer, start, end, ServerInfo(state=state, throughput=throughput))


def test_new_server_covers_the_weakest_window():
    spans = [_span("a", 0, 4, 2.0), _span("b", 2, 6, 1.0)]
    assert block_throughputs(spans, 8) == [2.0, 2.0, 3.0, 3.0, 1.0, 1.0, 0.0, 0.0]
    assert choose_best_blocks(2, spans, 8) == (6, 8)
    assert choose_best_start([1.0, 0.0, 0.0, 1.0], 2) == 1
    assert choose_best_start([0.0, 0.0, 0.0], 2) == 0  # ties go to the first window


def test_rebalancing_moves_only_when_it_helps():
    # Two servers stacked on [0, 4) of an 8-block model, nothing on [4, 8): one of them should move.
    spans = {"a": _span("a", 0, 4), "b": _span("b", 0, 4)}
    assert should_choose_other_blocks("a", spans, 8, 0.75, random.Random(0))
    # Each covers its own half: moving cannot help, and never to the span it already serves.
    spans = {"a": _span("a", 0, 4), "b": _span("b", 4, 8)}
    assert not should_choose_other_blocks("a", spans, 8, 0.75, random.Random(0))
    # The only server of some blocks never leaves them uncovered.
    spans = {"a": _span("a", 0, 4), "b": _span("b", 2, 8)}
    assert not should_choose_other_blocks("a", spans, 8, 0.75, random.Random(0))


def test_compute_spans_prefers_declared_ranges_and_higher_states():
    online = ServerInfo(state=ServerState.ONLINE, throughput=1.0, start_block=1, end_block=3)
    joining = ServerInfo(state=ServerState.JOINING, throughput=1.0)
    modules = [
        ModuleInfo("m.0", {"b": joining}),
        ModuleInfo("m.1", {"a": online, "b": joining}),
        ModuleInfo("m.2", {"a": online}),
    ]
    spans = compute_spans(modules, ServerState.JOINING)
    assert (spans["a"].start, spans["a"].end) == (1, 3)
    assert (spans["b"].start, spans["b"].end) == (0, 2)
    assert set(compute_spans(modules, ServerState.ONLINE)) == {"a"}


def test_cache_budget_is_all_or_nothing_and_always_released():
    async def scenario():
        budget = CacheBudget(max_bytes=1000, bytes_per_token_block=10, max_alloc_timeout=5)
        assert budget.tokens_left_rpc_info == 100 and budget.tokens_left_dht == 200
        assert budget.session_bytes(batch=2, max_length=5, num_blocks=3) == 300
        with pytest.raises(AllocationError, match="max cache size"):
            async with budget.allocate(2000, 0):
                pass
        async with budget.allocate(800, 0):
            assert budget.bytes_left == 200
            with pytest.raises(AllocationError, match="immediately"):
                async with budget.allocate(300, 0):
                    pass
            with pytest.raises(AllocationError, match=r"failed to allocate 300 bytes in 0\.1 seconds"):
                async with budget.allocate(300, 0.1):
                    pass
        assert budget.bytes_left == 1000
        with pytest.raises(RuntimeError):
            async with budget.allocate(500, 0):
                raise RuntimeError("a failing session")
        assert budget.bytes_left == 1000

        async def hold(seconds):
            async with budget.allocate(900, 0):
                await asyncio.sleep(seconds)

        holder = asyncio.create_task(hold(0.2))
        await asyncio.sleep(0.05)
        async with budget.allocate(500, 2.0):  # waits for the holder to finish
            assert budget.bytes_left == 500
        await holder

    asyncio.run(scenario())


def test_packing_limits():
    with pytest.raises(BadRequest, match="msgpack"):
        decode_metadata(b"\xc1")
    with pytest.raises(BadRequest, match="map"):
        decode_metadata(MSGPackSerializer.dumps([1, 2]))
    with pytest.raises(BadRequest, match="bytes"):
        decode_metadata(b"\x00" * (protocol.MAX_METADATA_BYTES + 1))
    proto = serialize_torch_tensor(torch.ones(2, 2))
    proto.dtype = "complex64"
    with pytest.raises(BadRequest, match="dtype"):
        deserialize_tensors([proto])
    with pytest.raises(BadRequest, match="rank"):
        deserialize_tensors([serialize_torch_tensor(torch.ones(1, 1, 1, 1, 1))])
    with pytest.raises(BadRequest, match="tensors in one request"):
        deserialize_tensors([serialize_torch_tensor(torch.ones(1))] * 9)
    legacy = serialize_torch_tensor(torch.ones(2, dtype=torch.bfloat16))
    assert deserialize_tensors([legacy])[0].dtype == torch.bfloat16
    # A token step's tensors (wire.deserialize_plain): the same tensors, the same refusals.
    plain = (torch.randn(2, 3, 8), torch.randn(1, 1, 4).half(), torch.arange(3), torch.zeros(0), torch.ones(2, 0))
    for tensor in plain:
        out = deserialize_tensors([serialize_torch_tensor(tensor)])[0]
        assert out.dtype == tensor.dtype and torch.equal(out, tensor) and not out.requires_grad
        out[...] = 0  # writable, and not the request's bytes
    short = serialize_torch_tensor(torch.ones(2, 2))
    short.buffer = short.buffer[:-4]
    with pytest.raises(BadRequest, match="does not match"):
        deserialize_tensors([short])
    grad = serialize_torch_tensor(torch.ones(2).requires_grad_())
    assert deserialize_tensors([grad])[0].requires_grad
    tensors = [torch.ones(1), torch.zeros(2)]
    assert unpack_args(((b"__T1", b"__T0"), {}), tensors)[0] is tensors[1]
    with pytest.raises(BadRequest, match="not sent"):
        unpack_args(((b"__T5",), {}), tensors)
    with pytest.raises(BadRequest, match="args_structure"):
        unpack_args(5, tensors)


def test_throughput_is_measured_once_then_read_from_the_cache(tiny_models, tmp_path):
    from corolla.swarm.models import open_checkpoint
    from corolla.swarm.server import throughput as tp

    checkpoint = open_checkpoint(tiny_models.get("llama"))
    cache = tmp_path / "throughput.json"
    first = tp.get_throughput(checkpoint, torch.device("cpu"), torch.float32, "none", cache)
    assert first.inference_rps > 0 and first.forward_rps > 0 and first.network_rps == 100e6 / (64 * 16)
    key = tp.cache_key(checkpoint, torch.device("cpu"), torch.float32, "none")
    assert set(json.loads(cache.read_text())) == {key}
    assert tp.get_throughput(checkpoint, torch.device("cpu"), torch.float32, "none", cache) == first
    again = tp.get_throughput(checkpoint, torch.device("cpu"), torch.float32, "none", cache, force_eval=True)
    assert again != first  # re-measured (timings never repeat exactly)
    assert again.announced(num_blocks=3) == min(again.forward_rps / 2, again.network_rps)


def test_server_stats_are_read_back_as_server_stats(tmp_path):
    from corolla.swarm.server.stats import Reachability, ServerStats, read_stats

    path = tmp_path / "stats.json"
    written = ServerStats(start_block=0, end_block=3, throughput=2.5, tokens_processed=7, batch_sizes={"2": 1})
    written.write(path)
    assert json.loads(path.read_text())["reachability"] == {}  # the file's format is unchanged
    read = read_stats(path)
    assert isinstance(read, ServerStats) and read.reachability is None
    assert (read.start_block, read.end_block, read.tokens_processed, read.batch_sizes) == (0, 3, 7, {"2": 1})
    assert read.started_at == written.started_at and read.uptime_s >= 0
    written.reachability = Reachability("relay", "Reachable via a relay", "", ["/ip4/1.2.3.4/tcp/1/p2p-circuit"], 5.0)
    written.write(path)
    assert read_stats(path).reachability == written.reachability
    # A server of another version: unknown keys dropped, mistyped ones left at their defaults.
    other = ServerStats.from_snapshot({"tokens_processed": "7", "throughput": 3, "future_counter": 1})
    assert other.tokens_processed == 0 and type(other.throughput) is float and other.throughput == 3.0
    assert read_stats(tmp_path / "missing.json") is None


def test_the_stats_file_never_goes_back_to_an_older_snapshot(tmp_path):
    """The periodic write runs on a thread; a state written later on the loop (e.g. the last one, at exit)
    must not be replaced by that thread's older snapshot."""
    from corolla.swarm.server.stats import ServerStats, StatsFile

    stats = ServerStats(model="m")
    file = StatsFile(tmp_path / "server.stats.json")
    stats.state = "online"
    periodic = file.take(stats)  # taken first, written late
    stats.state = "offline"
    final = file.take(stats)
    file.write(final)
    file.write(periodic)
    assert ServerStats.from_snapshot(json.loads(file.path.read_text())).state == "offline"
    assert [p.name for p in tmp_path.iterdir()] == ["server.stats.json"]  # no temporary file left
