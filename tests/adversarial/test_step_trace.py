"""The per-step timing trace (COROLLA_STEP_TRACE) that benchmarks/hostile_load.py --trace reads: one
server_step line per token step with ordered stamps, the same outputs with it on, and nothing written
when off."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID

from corolla.swarm import protocol, steptrace
from corolla.swarm.server.handler import HandlerLimits, TransformerConnectionHandler
from corolla.swarm.server.memory_cache import CacheBudget
from corolla.swarm.server.stats import ServerStats
from corolla.testing.wire import step_request
from tests.adversarial.conftest import HIDDEN, PREFIX

SPAN_BLOCKS = 2
PEER = PeerID(bytes([0, 36, 8, 1, 18, 32]) + bytes([7]) * 32)


def _session(local_span, session_id: str, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    """One inference session straight through a real handler (real span, real compute thread)."""
    executor = ThreadPoolExecutor(max_workers=1)
    budget = CacheBudget(SPAN_BLOCKS * 64 * 2 * HIDDEN * 4, 2 * HIDDEN * 4, max_alloc_timeout=1.0)
    limits = HandlerLimits(
        inference_max_length=64,
        max_batch_size=64,
        max_open_sessions=4,
        request_timeout=5.0,
        session_timeout=10.0,
        step_timeout=5.0,
    )
    handler = TransformerConnectionHandler(
        local_span.sub(0, SPAN_BLOCKS), PREFIX, budget, limits, ServerStats(), executor
    )
    chain = protocol.chain_uids(PREFIX, 0, SPAN_BLOCKS)

    async def requests():
        for i, hidden in enumerate(steps):
            yield step_request(chain, hidden, max_length=16, session_id=session_id, step_id=str(i))

    async def run():
        context = P2PContext(handle_name="rpc_inference", local_id=PEER, remote_id=PEER)
        return [deserialize_torch_tensor(r.tensors[0]) async for r in handler.rpc_inference(requests(), context)]

    try:
        return asyncio.run(run())
    finally:
        executor.shutdown(wait=True)


def test_each_step_is_traced_in_order_and_the_outputs_do_not_change(local_span, tmp_path, monkeypatch):
    torch.manual_seed(0)
    steps = [torch.randn(1, 4, HIDDEN), *(torch.randn(1, 1, HIDDEN) for _ in range(3))]
    monkeypatch.setattr(steptrace, "_directory", None)
    untraced = _session(local_span, "untraced", steps)

    trace = tmp_path / "trace"
    monkeypatch.setattr(steptrace, "_directory", str(trace))
    traced = _session(local_span, "traced", steps)

    assert all(torch.equal(a, b) for a, b in zip(untraced, traced, strict=True))
    lines = [json.loads(line) for path in trace.glob("*.jsonl") for line in path.read_text().splitlines()]
    rows = [line for line in lines if line["event"] == "server_step"]
    assert [(row["session"], row["step"]) for row in rows] == [("traced", str(i)) for i in range(4)]
    for row in rows[1:]:  # the first step's read is the session's opening, not stamped
        started, ended = row["compute"]
        assert row["read"] <= row["handler"] <= started <= ended <= row["reply"]
        assert isinstance(row["inline"], bool) and len(row["queue"]) == 2


def test_nothing_is_written_when_the_trace_is_off(tmp_path, monkeypatch):
    monkeypatch.setattr(steptrace, "_directory", None)
    steptrace.mark("server_step", session="s", step="0")
    assert not steptrace.enabled() and not list(tmp_path.iterdir())
