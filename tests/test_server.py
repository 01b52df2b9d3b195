"""A real Corolla block server process on 127.0.0.1, driven at the wire level."""

from __future__ import annotations

import time

import pytest
import torch
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from corolla.swarm import protocol
from corolla.swarm.dht_records import get_module_infos
from corolla.swarm.models import load_span
from corolla.testing.swarm import tiny_block_server
from corolla.testing.wire import WireClient, new_ids, step_request

PREFIX = "tiny-test"
BLOCKS = 6
CACHE_TOKENS = 64  # per block: one session of max_length 64 over all 6 blocks fills the budget
CHAIN = protocol.chain_uids(PREFIX, 0, BLOCKS)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with tiny_block_server(
        tmp_path_factory.mktemp("server"),
        model_dir,
        PREFIX,
        BLOCKS,
        cache_tokens=CACHE_TOKENS,
        step_timeout=20,
        update_period=5,
    ) as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    with WireClient(server.maddr) as wire:
        yield wire


@pytest.fixture(scope="module")
def local_span(model_dir):
    return load_span(model_dir, 0, BLOCKS)


def full_cache(client, server) -> int:
    return client.info(server.peer_id)["cache_tokens_available"]


def test_rpc_info_schema(client, server):
    info = client.info(server.peer_id, f"{PREFIX}.0")
    assert info["version"] == protocol.PETALS_COMPAT_VERSION and info["dht_client_mode"] is False
    assert info["cache_tokens_available"] == BLOCKS * CACHE_TOKENS
    assert info["keyword_names"] == ()
    (hidden,), kwargs = info["forward_schema"]
    assert isinstance(hidden, BatchTensorDescriptor) and hidden.size == (None, 1, 2048, 64) and kwargs == {}
    assert len(info["outputs_schema"]) == 1
    args, _ = info["inference_schema"]
    assert [d.dtype for d in args] == [torch.float32, torch.float32, torch.int64]


def test_inference_steps_and_rollback_match_local(client, server, local_span):
    torch.manual_seed(0)
    prompt, step1, step2, replacement = (torch.randn(1, n, 64) for n in (5, 1, 2, 1))
    ids = new_ids()
    requests = [
        step_request(CHAIN, prompt, max_length=32, start_from_position=0, **ids),
        step_request(CHAIN, step1, session_id=ids["session_id"], step_id="s1", start_from_position=5),
        step_request(CHAIN, step2, session_id=ids["session_id"], step_id="s2", start_from_position=6),
        # roll back to position 6 (forget step2) and continue with another token
        step_request(CHAIN, replacement, session_id=ids["session_id"], step_id="s3", start_from_position=6),
        step_request("", None),
    ]
    result = client.session(server.peer_id, requests)
    assert result.error is None, result.error
    cache = local_span.new_cache()
    expected = [local_span(prompt, cache), local_span(step1, cache)]
    after_step1 = cache.length
    expected.append(local_span(step2, cache))
    cache.rollback(after_step1)
    expected.append(local_span(replacement, cache))
    assert len(result.outputs) == 4
    for got, want in zip(result.outputs, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_sub_chain_forward_and_backward(client, server, local_span):
    hidden = torch.randn(2, 4, 64)
    uid = protocol.chain_uids(PREFIX, 2, 5)
    got = client.forward(server.peer_id, uid, hidden)
    assert torch.allclose(got, local_span.sub(2, 5)(hidden), atol=1e-5)


def test_announcement_has_exact_types(client, server):
    infos = client.run(get_module_infos(client.dht, [protocol.make_uid(PREFIX, i) for i in range(BLOCKS)]))
    for module in infos:
        info = module.servers[server.peer_id]
        assert info.state == protocol.ServerState.ONLINE
        assert (info.start_block, info.end_block) == (0, BLOCKS)
        assert type(info.throughput) is float and info.throughput == 25.0
        assert type(info.cache_tokens_left) is int and info.cache_tokens_left == 2 * BLOCKS * CACHE_TOKENS
        assert info.torch_dtype == "float32" and info.quant_type == "none"
    models = client.dht.get(protocol.MODELS_INDEX_KEY, latest=True)
    assert models.value[PREFIX].value == {"num_blocks": BLOCKS, "repository": None}


MALFORMED = {
    "unknown uid": (
        lambda: [step_request(f"{PREFIX}.99", torch.randn(1, 2, 64), max_length=8, **new_ids())],
        "does not serve",
    ),
    "non-consecutive chain": (
        lambda: [step_request(f"{PREFIX}.0 {PREFIX}.2", torch.randn(1, 2, 64), max_length=8, **new_ids())],
        "consecutive",
    ),
    "huge max_length": (
        lambda: [step_request(CHAIN, torch.randn(1, 2, 64), max_length=10**9, **new_ids())],
        "Cannot allocate KV cache",
    ),
    "missing max_length": (lambda: [step_request(CHAIN, torch.randn(1, 2, 64), **new_ids())], "max_length"),
    "bad msgpack": (lambda: [step_request(CHAIN, torch.randn(1, 2, 64), raw_metadata=b"\xc1\xff\x00")], "msgpack"),
    "wrong hidden size": (
        lambda: [step_request(CHAIN, torch.randn(1, 2, 63), max_length=8, **new_ids())],
        "hidden size",
    ),
    "integer hidden states": (
        lambda: [step_request(CHAIN, torch.ones(1, 2, 64, dtype=torch.int64), max_length=8, **new_ids())],
        "floating",
    ),
    "length past max_length": (
        lambda: [step_request(CHAIN, torch.randn(1, 9, 64), max_length=8, **new_ids())],
        "Maximum length exceeded",
    ),
    "batch changes mid-session": (
        lambda: [
            step_request(CHAIN, torch.randn(1, 2, 64), max_length=8, session_id="b1", step_id="1"),
            step_request(CHAIN, torch.randn(2, 1, 64), session_id="b1", step_id="2"),
        ],
        "batch size changed",
    ),
    "hypo_ids out of range": (
        lambda: [step_request(CHAIN, torch.randn(1, 2, 64), hypo_ids=torch.tensor([3]), max_length=8, **new_ids())],
        "hypo_ids",
    ),
    "rollback past the end": (
        lambda: [step_request(CHAIN, torch.randn(1, 2, 64), max_length=8, start_from_position=5, **new_ids())],
        "start_from_position",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_gets_an_error_and_the_server_recovers(client, server, local_span, case):
    build, expected_error = MALFORMED[case]
    full = full_cache(client, server)
    result = client.session(server.peer_id, build(), reply_timeout=5.0)
    assert result.error is not None and expected_error in result.error, result.error
    # The server still serves correct outputs, and its free cache is back to full.
    hidden = torch.randn(1, 3, 64)
    ok = client.session(
        server.peer_id, [step_request(CHAIN, hidden, max_length=8, **new_ids()), step_request("", None)]
    )
    assert ok.error is None and torch.allclose(ok.outputs[0], local_span(hidden), atol=1e-5)
    assert full_cache(client, server) == full


def test_every_refused_request_hears_why(client, server):
    # A refused request's error reply must survive the close that follows it (p2pd resets a stream
    # closed under it, which can overtake the reply): many refusals in a row, each one explained.
    refusals = [
        client.session(
            server.peer_id, [step_request(CHAIN, torch.randn(1, 2, 64), raw_metadata=b"\xc1")], reply_timeout=5.0
        ).error
        for _ in range(40)
    ]
    assert all(error is not None and "msgpack" in error for error in refusals), refusals


def test_tensor_buffer_that_lies_about_its_shape(client, server):
    request = step_request(CHAIN, torch.randn(1, 2, 64), max_length=8, **new_ids())
    request.tensors[0].size[:] = [1, 200, 64]
    result = client.session(server.peer_id, [request])
    assert result.error is not None and "does not match shape" in result.error


def test_duplicate_step_id_gets_no_second_reply(client, server, local_span):
    hidden, step = torch.randn(1, 3, 64), torch.randn(1, 1, 64)
    ids = new_ids()
    result = client.session(
        server.peer_id,
        [
            step_request(CHAIN, hidden, max_length=8, **ids),
            step_request(CHAIN, step, session_id=ids["session_id"], step_id=ids["step_id"]),  # duplicate of step 1
            step_request(CHAIN, step, session_id=ids["session_id"], step_id="next"),
            step_request("", None),
        ],
        reply_timeout=3.0,
    )
    assert result.error is None and len(result.outputs) == 2
    cache = local_span.new_cache()
    local_span(hidden, cache)
    assert torch.allclose(result.outputs[1], local_span(step, cache), atol=1e-5)


def test_stream_dropped_mid_session_frees_the_cache(client, server):
    full = full_cache(client, server)
    result = client.session(
        server.peer_id, [step_request(CHAIN, torch.randn(1, 3, 64), max_length=64, **new_ids()), None]
    )  # ends the stream without the closing request
    assert result.error is None
    deadline = time.monotonic() + 10
    while full_cache(client, server) != full and time.monotonic() < deadline:
        time.sleep(0.2)
    assert full_cache(client, server) == full


def test_a_full_cache_refuses_new_sessions_until_one_closes(client, server):
    first = client.session(
        server.peer_id, [step_request(CHAIN, torch.randn(1, 1, 64), max_length=64, **new_ids()), step_request("", None)]
    )
    assert first.error is None  # a whole-budget session fits alone
    holder = client.loop.create_task(_hold_session(client, server, seconds=3.0))
    time.sleep(1.0)
    client.run(_idle(0.5))
    refused = client.session(server.peer_id, [step_request(CHAIN, torch.randn(1, 1, 64), max_length=8, **new_ids())])
    assert refused.error is not None and "out of memory" in refused.error
    client.run(holder)


async def _idle(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


async def _hold_session(client, server, seconds: float) -> None:
    import asyncio

    from hivemind.utils import MSGPackSerializer  # noqa: F401

    async def producer():
        yield step_request(CHAIN, torch.randn(1, 1, 64), max_length=64, **new_ids())
        await asyncio.sleep(seconds)
        yield step_request("", None)

    stream = await client.stub(server.peer_id).rpc_inference(producer())
    async for _ in stream:
        pass


def test_stats_count_the_work(server):
    stats = server.wait_state("online")
    time.sleep(1.2)
    stats = server.stats()
    assert stats["inference_steps"] > 0 and stats["tokens_processed"] > 0
    assert stats["sessions_opened"] >= stats["sessions_active"] >= 0
    assert stats["requests_refused"] >= len(MALFORMED)
    assert stats["bytes_in"] > 0 and stats["bytes_out"] > 0 and stats["uptime_s"] > 0
    assert stats["forward_requests"] >= 1
