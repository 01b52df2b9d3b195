"""Checking one server on purpose (the node's "check this server" and `corolla swarm check`): its outputs
against this computer's own run of its blocks when they fit here, else against other servers'."""

from __future__ import annotations

import asyncio
import logging
import math
import time

import torch

from corolla.swarm.client.routing import RouteSegment, SwarmView
from corolla.swarm.client.verification import (
    CHECK_TIMEOUT_S,
    TOLERANCE,
    CheckJob,
    Verdict,
    check_outputs,
    ledger_of,
    pair_tolerance,
    relative_error,
    replay_on,
)

logger = logging.getLogger(__name__)

LOCAL_CHECK_MAX_BYTES = 2 * 1024**3  # this computer runs the blocks itself when they weigh at most this


async def find_span(view: SwarmView, peer: str):
    """The span `peer` announces for this model (also for blocked servers); None if it announces none."""
    from corolla.swarm.dht_records import compute_spans, get_module_infos
    from corolla.swarm.protocol import ServerState

    await view.refresh()
    if peer in view.spans:
        return view.spans[peer]
    infos = await get_module_infos(view.dht, view.uids())
    return compute_spans(infos, min_state=ServerState.ONLINE).get(peer)


def _local_runner(model, start: int, end: int):
    """A float32 CPU copy of blocks [start, end) if this computer can hold them, else None."""
    from corolla.swarm.models import LoadOptions, load_span
    from corolla.swarm.models.loading import estimate_memory

    try:
        estimate = estimate_memory(model.checkpoint, torch.float32)
        if sum(estimate.per_block_bytes[start:end]) > LOCAL_CHECK_MAX_BYTES:
            return None
        return load_span(model.checkpoint, start, end, LoadOptions(device="cpu", dtype="float32"))
    except Exception as exc:  # no weights here (a hub model not downloaded), not enough memory, ...
        logger.info("cannot run blocks %d:%d here: %s", start, end, exc)
        return None


async def check_server(model, peer: str) -> Verdict | None:
    """Send `peer` known inputs for its blocks and compare its outputs with this computer's own run of
    those blocks (when it can load them) or with other servers'. None if `peer` serves nothing here."""
    view: SwarmView = model.view
    span = await find_span(view, peer)
    if span is None:
        return None
    ledger = ledger_of(view)
    ledger.infos[peer] = span.server_info
    start, end = span.start, span.end
    vocab = int(getattr(model.config, "vocab_size", None) or model.get_input_embeddings().num_embeddings)
    ids = torch.tensor([[(7 + 31 * i) % vocab for i in range(16)]])  # known inputs: the same every time
    with torch.no_grad():
        inputs = model.family.embed(model.client_model, ids).detach().float().cpu()
    claimed = await replay_on(view, [RouteSegment(peer, start, end)], inputs, timeout=CHECK_TIMEOUT_S)
    runner = await asyncio.to_thread(_local_runner, model, start, end)
    if runner is not None:
        with torch.no_grad():
            reference = await asyncio.to_thread(lambda: runner(inputs, runner.new_cache()).float())
        error = relative_error(claimed, reference)
        tolerance = pair_tolerance(view, [peer], [], local=TOLERANCE["float32"])
        if error <= tolerance:
            ledger.checks[peer] += 1
            return Verdict(
                peer,
                "verified",
                f"its outputs for blocks {start}:{end} match this computer's own run "
                f"(error {error:.3g}, tolerance {tolerance:.3g})",
                error,
                tolerance,
                ["this computer"],
            )
        evidence = {
            "peer_id": peer,
            "dht_prefix": view.dht_prefix,
            "blocks": [start, end],
            "step": None,
            "positions": int(inputs.shape[1]),
            "error": float(error) if math.isfinite(error) else 2.0,
            "tolerance": float(tolerance),
            "disagreed_with": ["this computer"],
            "flagged_at": time.time(),
            "detail": f"its outputs for blocks {start}:{end} differ from this computer's own run "
            f"(error {error:.3g}, tolerance {tolerance:.3g})",
        }
        ledger.flag(view, evidence)
        return Verdict(peer, "flagged", evidence["detail"], error, tolerance, ["this computer"])
    job = CheckJob(None, RouteSegment(peer, start, end), inputs, claimed, 0, step=None)
    verdict = await check_outputs(view, job)
    if verdict is None:
        return Verdict(
            peer, "unverified", f"no other server covers blocks {start}:{end} and this computer cannot run them"
        )
    if verdict.state == "disputed":
        verdict.state = "unverified"
        verdict.detail = f"it {verdict.detail}, so neither can be trusted yet"
    return verdict
