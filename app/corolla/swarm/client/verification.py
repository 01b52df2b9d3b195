"""Spot checks: catch servers that return wrong results (Petals itself has no verification at all).

A session keeps every input of each span (for exact failover); this module also keeps each span's
outputs. For a sample of steps it replays the span's inputs so far on a second, independent server
(a fresh rpc_inference session, the same request a failover replay sends, so a server cannot tell a
check from ordinary work) and compares every output position with what the first server returned.
The check runs as a task beside the user's stream: the session never waits for it.

- Tolerance comes from the two servers' announced dtype and quantization (TOLERANCE, calibrated on
  honest float32/bfloat16/float16/int8/nf4 servers: see tests/test_verification.py).
- A server's first FIRST_STEPS steps (per client) are all checked; later steps at `spot_check_rate`.
- On a mismatch a third server, independent of both, breaks the tie. Without one nobody is flagged
  (two servers disagreeing cannot tell which one lies); the dispute is logged.
- A flagged server is blocked for this client (and, through `on_flag`, for the node), and the session
  raises LiarCaught at its next step or when it settles; generate() then re-routes around the liar and
  re-runs, so the tokens it returns are what honest servers give.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from corolla.swarm.client.growing_buffer import append_positions
from corolla.swarm.client.ledger import FIRST_STEPS, Ledger, block, ledger_of
from corolla.swarm.client.routing import MissingBlocksError, RouteSegment, SwarmView, choose_route
from corolla.swarm.client.speed import speed_of
from corolla.swarm.client.streams import ServerStream, StepExtras, replay

__all__ = ["FIRST_STEPS", "Ledger", "block", "ledger_of"]  # where callers have always found them
logger = logging.getLogger(__name__)

# Largest honest relative error of one server's outputs against the exact (float32) result, per
# announced precision: measured on tiny random-weight models (the worst case: quantization error is
# large next to their small residual stream), with a margin. Two servers may differ by the sum.
TOLERANCE = {
    "float32": 0.005,  # different kernels / batch shapes (and TF32 on GPUs) differ slightly
    "float16": 0.02,
    "bfloat16": 0.08,
    "int8": 0.25,
    "nf4": 0.9,
}
UNKNOWN_PRECISION_TOLERANCE = 0.9  # a server that announces nothing (old Petals) gets the loosest known
# Two servers may differ by the sum of their tolerances, but never by this much: a relative error of
# 1 is what zeros (or any output unrelated to the input) give, so a pair of loose precisions (nf4 + nf4
# sums to 1.8) must not wave garbage through. Measured on SmolLM2's real weights, 10-block spans against
# float32: bfloat16 <= 0.032, int8 <= 0.11, nf4 <= 0.34, so honest pairs stay well below it.
MAX_PAIR_TOLERANCE = 0.9
CHECK_TIMEOUT_S = 60.0
# At most this long generate() waits, after its last token, for checks in flight; the rest finish in the
# background (and can still flag the server, for later generations). A checker that stalls counts against it.
SETTLE_TIMEOUT_S = 1.0
MAX_CHECKS_IN_FLIGHT = 4  # per session: checks are extra load on the swarm
MAX_CHECK_RETRIES = 2  # per server session: a check that fails (not one that mismatches) is tried again


class LiarCaught(RuntimeError):
    """A server on this session's route was caught returning wrong results; re-route and re-run."""

    def __init__(self, evidence: dict):
        self.evidence = evidence
        super().__init__(
            f"server …{evidence['peer_id'][-6:]} returned wrong results for blocks "
            f"{evidence['blocks'][0]}:{evidence['blocks'][1]} (error {evidence['error']:.3g}, "
            f"tolerance {evidence['tolerance']:.3g})"
        )


def precision_tolerance(torch_dtype: str | None, quant_type: str | None) -> float:
    """What one honest server's outputs may differ from exact results, from its announcement."""
    quant = (quant_type or "none").lower()
    if quant in TOLERANCE:
        return TOLERANCE[quant]
    if quant not in ("none", ""):
        return UNKNOWN_PRECISION_TOLERANCE
    dtype = (torch_dtype or "").replace("torch.", "")
    return TOLERANCE.get(dtype, UNKNOWN_PRECISION_TOLERANCE)


def pair_tolerance(view: SwarmView, peers_a: list[str], peers_b: list[str], local: float | None = None) -> float:
    """How far two honest computations of the same blocks may differ: the sum of the loosest tolerance
    on each side (`local` is this computer's own run)."""

    def side(peers: list[str]) -> float:
        worst = 0.0
        for peer in peers:
            span = view.spans.get(peer)
            info = span.server_info if span is not None else ledger_of(view).infos.get(peer)
            worst = max(
                worst,
                precision_tolerance(info.torch_dtype, info.quant_type) if info else UNKNOWN_PRECISION_TOLERANCE,
            )
        return worst

    return min(side(peers_a) + (local if local is not None else side(peers_b)), MAX_PAIR_TOLERANCE)


def relative_error(claimed: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest per-position relative L2 difference, symmetric and in [0, 2] (zeros give 1)."""
    a, b = claimed.float(), reference.float()
    if a.shape != b.shape:
        return math.inf
    if not bool(torch.isfinite(a).all()):
        return math.inf
    diff = (a - b).norm(dim=-1)
    scale = torch.maximum(a.norm(dim=-1), b.norm(dim=-1)).clamp_min(1e-6)
    return float((diff / scale).max()) if diff.numel() else 0.0


def promised_steps(rate: float, confidence: float = 0.999) -> int:
    """Steps after a server starts lying within which a check catches it with `confidence` (every
    check compares all of a span's outputs so far, so one sampled step after the lie is enough)."""
    if rate >= 1:
        return 1
    if rate <= 0:
        return math.inf
    return math.ceil(math.log(1 - confidence) / math.log(1 - rate))


@dataclass
class Verdict:
    peer_id: str
    state: str  # verified | flagged | unverified | disputed
    detail: str
    max_error: float | None = None
    tolerance: float | None = None
    compared_with: list[str] = field(default_factory=list)


# --- running a span on other servers -------------------------------------------------------------


async def replay_on(
    view: SwarmView,
    route: list[RouteSegment],
    inputs: torch.Tensor,
    *,
    adapter: str | None = None,
    prompts: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    timeout: float | None = None,
) -> torch.Tensor:
    """Outputs of `route` (segments covering some blocks in order) for `inputs` [batch, L, hidden],
    each segment in a fresh inference session closed at once. Without `timeout`, each server gets the
    deadline this client expects of it (speed.py), and one that misses it is counted as stalling."""
    speed = speed_of(view)
    tokens = inputs.shape[0] * inputs.shape[1]
    offset = route[0].start
    streams = [ServerStream(segment, view.dht_prefix, inputs.shape[1], adapter) for segment in route]

    def extras_for(stream: ServerStream) -> StepExtras:
        segment = stream.segment
        span_prompts = None if prompts is None else prompts[segment.start - offset : segment.end - offset]
        return StepExtras(span_prompts, None, mask)

    def timeout_for(stream: ServerStream, _inputs: torch.Tensor) -> float:
        return timeout or speed.deadline(
            view, stream.segment.peer_id, stream.segment.end - stream.segment.start, tokens
        )

    def stalled(stream: ServerStream, seconds: float) -> None:
        segment = stream.segment
        speed.stalled(view, segment.peer_id, segment.start, segment.end, tokens, seconds, what="check")
        view.ban(segment.peer_id)

    try:
        for stream in streams:
            await stream.open(view, view.config.connect_timeout)
        return await replay(
            streams,
            inputs,
            extras_for=extras_for,
            timeout_for=timeout_for,
            on_output=lambda stream, _inputs, _output, seconds: speed.observe(stream.segment.peer_id, tokens, seconds),
            on_timeout=stalled,
        )
    finally:
        await asyncio.gather(*(stream.close() for stream in streams), return_exceptions=True)


def other_route(view: SwarmView, start: int, end: int, avoid: set[str]) -> list[RouteSegment] | None:
    """A route over [start, end) through none of `avoid` (nor blocked servers): a random single server
    that covers it all if there is one, else the cheapest chain; None if there is none."""
    spans = {p: s for p, s in view.spans.items() if p not in avoid and p not in view.config.blocked_servers}
    single = [p for p, s in spans.items() if s.start <= start and s.end >= end]
    if single:
        # Chosen at random: a liar cannot count on being checked by an accomplice it knows.
        peer = ledger_of(view).rng.choice(sorted(single))
        return [RouteSegment(peer, start, end)]
    try:
        return choose_route(spans, start, end, view.rtts)
    except MissingBlocksError:
        return None


def peers_of(route: list[RouteSegment]) -> list[str]:
    return [segment.peer_id for segment in route]


# --- checks within a session ---------------------------------------------------------------------


class _Kept:
    """Every output of a stream's server from position `known_from` on, as the first `_count` positions
    of a buffer that grows by doubling: a token step appends in place (a torch.cat per token copied the
    whole session's outputs: O(length) per token, ~3 ms a token at 2,000 positions of a 4,096-wide model).
    `outputs` is a view that later appends never write to (they go past it, or to a new buffer after a
    rollback or a reordering), so a check launched on it keeps its snapshot."""

    __slots__ = ("_buffer", "_count", "checked_to", "known_from")

    def __init__(self, outputs: torch.Tensor, known_from: int):
        self._buffer, self._count = outputs, outputs.shape[1]
        self.known_from = known_from
        self.checked_to = -1  # the end position of the outputs the last check launched compared

    @property
    def outputs(self) -> torch.Tensor:
        return self._buffer[:, : self._count]

    @outputs.setter
    def outputs(self, value: torch.Tensor) -> None:
        self._buffer, self._count = value, value.shape[1]  # exactly its width: the next append reallocates

    @property
    def end(self) -> int:
        return self.known_from + self._count

    def append(self, output: torch.Tensor) -> None:
        self._buffer = append_positions(self._buffer, self._count, output)
        self._count += output.shape[1]


class SessionVerifier:
    """The spot checks of one inference session: `observe` after each span's step, `raise_if_caught`
    before the next, `settle` at the end."""

    def __init__(self, session):
        self.session = session
        self.view: SwarmView = session.view
        self.ledger = ledger_of(self.view)
        self.kept: dict[str, _Kept] = {}  # by the stream's session id (unique per server session)
        self.tasks: set[asyncio.Task] = set()
        self.owed: set[str] = set()  # streams whose sampled check waits for a free slot
        self.failures: Counter = Counter()  # checks that failed (not mismatched), per stream
        self.caught: dict | None = None
        self.enabled = self.view.config.spot_check_rate > 0  # 0: spot checks off
        self.checks_started = 0
        self.steps_observed: Counter = Counter()

    def observe(self, stream, output: torch.Tensor) -> None:
        """Called after `stream`'s server answered a step (its history already holds the inputs)."""
        if not self.enabled or stream.history is None:
            return
        peer = stream.segment.peer_id
        total = stream.history.shape[1]
        length = output.shape[1]
        kept = self.kept.get(stream.session_id)
        if kept is None or kept.outputs.shape[0] != output.shape[0]:
            kept = _Kept(output, total - length)
        else:
            end = kept.end
            if end > total - length:  # the session rolled back: forget outputs past the new position
                kept.outputs = kept.outputs[:, : max(0, total - length - kept.known_from)]
                end = kept.end
                kept.checked_to = min(kept.checked_to, end)  # outputs past it will be new ones
            if end == total - length:
                kept.append(output)
            else:
                kept = _Kept(output, total - length)
        self.kept[stream.session_id] = kept
        self.steps_observed[peer] += 1
        if peer in self.view.spans:
            self.ledger.infos[peer] = self.view.spans[peer].server_info
        sampled = self.ledger.should_check(peer, self.view.config.spot_check_rate)
        if not sampled and stream.session_id not in self.owed:
            return
        if len(self.tasks) >= MAX_CHECKS_IN_FLIGHT:
            self.owed.add(stream.session_id)  # deferred, not dropped: the next step's check covers this one too
            return
        self.owed.discard(stream.session_id)
        self._launch(stream, kept)

    def _launch(self, stream, kept: _Kept) -> None:
        # Snapshots: the session goes on (and may roll back or reorder) while the check runs.
        peer = stream.segment.peer_id
        prompts = self.session.prompts
        if prompts is not None:
            prompts = prompts[stream.segment.start : stream.segment.end]
        job = CheckJob(
            stream_id=stream.session_id,
            segment=stream.segment,
            inputs=stream.history,
            claimed=kept.outputs,
            known_from=kept.known_from,
            step=self.steps_observed[peer],
            adapter=self.session.adapter,
            prompts=prompts,
            mask=getattr(self.session, "_mask", None),
            witness=getattr(self.session, "saw", None),
        )
        kept.checked_to = kept.end
        self.checks_started += 1
        task = asyncio.get_running_loop().create_task(self._run(job))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def reorder(self, hypo_ids: torch.Tensor) -> None:
        for kept in self.kept.values():
            if kept.outputs.shape[0] == hypo_ids.shape[0]:
                kept.outputs = kept.outputs[hypo_ids]

    async def _run(self, job: CheckJob) -> None:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                verdict = await check_outputs(self.view, job)
        except Exception as exc:  # a checker failing is not evidence against anyone
            logger.debug("spot check of %s failed: %s", job.segment, exc)
            self.failures[job.stream_id] += 1
            if self.failures[job.stream_id] <= MAX_CHECK_RETRIES:  # a busy checker: try again next step
                self.owed.add(job.stream_id)
            return
        if verdict is None or verdict.state != "flagged" or self.caught is not None:
            return
        # Only a liar still on the route changes this session (after a re-route it no longer is).
        if verdict.peer_id in {s.segment.peer_id for s in self.session.streams}:
            self.caught = self.ledger.flagged.get(verdict.peer_id)

    def raise_if_caught(self) -> None:
        if self.caught is not None:
            caught, self.caught = self.caught, None
            raise LiarCaught(caught)

    async def settle(self, timeout: float = SETTLE_TIMEOUT_S) -> None:
        """Run the checks still owed, wait (at most `timeout`) for those in flight, then raise LiarCaught
        if one caught a liar. Checks still running go on without this session (`detach`)."""
        for stream in self.session.streams:
            kept = self.kept.get(stream.session_id)
            # Owed checks, and a last one for any server whose latest outputs no check has compared:
            # a lie in the steps after the last sampled check would otherwise reach the returned tokens
            # (one replay of the span per generate() at most; streamed text is already out).
            if kept is not None and self.enabled and (stream.session_id in self.owed or kept.checked_to < kept.end):
                self.owed.discard(stream.session_id)
                self._launch(stream, kept)
        if self.tasks:  # asyncio.wait, not a gather under a timeout: the checks must outlive this wait
            await asyncio.wait(list(self.tasks), timeout=timeout)
        self.raise_if_caught()

    def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()

    def detach(self) -> None:
        """The session closes: its checks in flight run to their end (CHECK_TIMEOUT_S at most) in the
        background, where a mismatch still flags the server for this client's later sessions."""
        background = self.ledger.background
        for task in self.tasks:
            background.add(task)
            task.add_done_callback(background.discard)
        self.owed.clear()


@dataclass
class CheckJob:
    stream_id: str | None
    segment: RouteSegment
    inputs: torch.Tensor  # [batch, positions, hidden]: every input of the span so far
    claimed: torch.Tensor  # the server's outputs for positions [known_from, positions)
    known_from: int
    step: int
    adapter: str | None = None
    prompts: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    witness: Callable[[list[RouteSegment]], None] | None = None  # told which servers a replay goes to


async def check_outputs(view: SwarmView, job: CheckJob) -> Verdict | None:
    """Compare a server's outputs with another server's run of the same inputs; None if no other
    server covers the span (the server stays unverified)."""
    ledger = ledger_of(view)
    peer, start, end = job.segment.peer_id, job.segment.start, job.segment.end
    checker = other_route(view, start, end, {peer})
    if checker is None:
        return None
    mask = job.mask[:, : job.inputs.shape[1]] if job.mask is not None else None

    async def run(route):
        if job.witness is not None:
            job.witness(route)
        out = await replay_on(view, route, job.inputs, adapter=job.adapter, prompts=job.prompts, mask=mask)
        return out[:, job.known_from :]

    reference = await run(checker)
    error = relative_error(job.claimed, reference)
    tolerance = pair_tolerance(view, [peer], peers_of(checker))
    if error <= tolerance:
        for p in [peer, *peers_of(checker)]:
            ledger.checks[p] += 1
        return Verdict(peer, "verified", "agrees with another server", error, tolerance, peers_of(checker))
    # They disagree: a third computation, through neither, breaks the tie.
    third = other_route(view, start, end, {peer, *peers_of(checker)})
    if third is None:
        ledger.disputes += 1
        logger.warning(
            "server …%s and %s disagree on blocks %d:%d (error %.3g > %.3g) and no third server can tell "
            "which is right",
            peer[-6:],
            ", ".join(p[-6:] for p in peers_of(checker)),
            start,
            end,
            error,
            tolerance,
        )
        return Verdict(peer, "disputed", "disagrees with another server; no third server", error, tolerance)
    tiebreak = await run(third)
    error_third = relative_error(job.claimed, tiebreak)
    agree = relative_error(reference, tiebreak) <= pair_tolerance(view, peers_of(checker), peers_of(third))
    if error_third > pair_tolerance(view, [peer], peers_of(third)) and agree:
        liar, honest, liar_error = peer, [*peers_of(checker), *peers_of(third)], error
        step = job.step
    elif error_third <= pair_tolerance(view, [peer], peers_of(third)) and not agree and len(checker) == 1:
        liar, honest, liar_error = checker[0].peer_id, [peer, *peers_of(third)], error
        step = None  # caught while checking someone else
    else:
        ledger.disputes += 1
        return Verdict(peer, "disputed", "three servers disagree", error, tolerance)
    evidence = {
        "peer_id": liar,
        "dht_prefix": view.dht_prefix,
        "blocks": [start, end],
        "step": step,
        "positions": int(job.inputs.shape[1]),
        "error": float(liar_error) if math.isfinite(liar_error) else 2.0,
        "tolerance": float(tolerance),
        "disagreed_with": honest,
        "flagged_at": time.time(),
        "detail": f"its outputs for blocks {start}:{end} differ from {len(honest)} other servers' "
        f"(error {liar_error:.3g}, tolerance {tolerance:.3g})",
    }
    ledger.flag(view, evidence)
    return Verdict(liar, "flagged", evidence["detail"], liar_error, tolerance, honest)
