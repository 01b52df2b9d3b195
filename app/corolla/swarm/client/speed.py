"""How fast each server answers this client: expected step times, adaptive deadlines, slow servers.

A server that stays connected but answers slowly (or never) costs more than one that crashes: a crash
is noticed at once, a stall only when a timeout runs out. So every step gets a deadline of its own,
from what this client expects of that server:

- measured: an EWMA of the server's step times as this client saw them (send to reply), by step size
  (tokens in the step, in powers of two); a size not seen yet is estimated from the nearest one;
- announced, before any measurement: its blocks' compute time at its announced speed, plus the
  client's round trip to it.

deadline = DEADLINE_FLOOR_S + DEADLINE_FACTOR x expected, at most the config's request_timeout. The
floor (seconds) is what an honest server that is busy for a moment, on a slow link, stays under; a
step past its deadline is hedged (session.py): the same step goes to another server of the same
blocks with the kept inputs replayed, and whichever answers first wins.

A server whose steps are consistently (the median of its latest ones) SLOW_FACTOR times slower than
announced, or than another server of the same blocks measured here, is judged slow: the session
replaces it and routing discounts its announced speed by what was measured (`discounts`, fading
with a half-life of DISCOUNT_HALF_LIFE_S). Losing a
hedge race (a stall) does the same. Each verdict keeps its evidence, which `on_slow` hands on (the node records it).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

DEADLINE_FLOOR_S = 3.0  # never hedge a step sooner than this: a busy honest server on a slow link stays under it
DEADLINE_FACTOR = 4.0  # ... nor sooner than this many times the expected step time on top
EWMA_ALPHA = 0.3  # weight of the newest step time
SLOW_FACTOR = 4.0  # consistently this many times slower than announced (or than another server): slow
SLOW_MARGIN_S = 0.25  # ... and by at least this much per step (tiny steps' overheads are not slowness)
SLOW_MIN_STEPS = 4  # steps of one size measured before a server can be judged slow
RECENT_STEPS = 8  # a verdict reads the median of this many latest steps of one size
DEFAULT_RPS = 300.0  # per block, for a server that announces no speed (as routing assumes)
UNKNOWN_RTT_S = 0.15
MAX_DISCOUNT = 1e4
MAX_PEERS = 1024  # servers whose step times are kept
DISCOUNT_HALF_LIFE_S = 600.0  # a slow verdict's weight in routing halves this often


def size_bucket(tokens: int) -> int:
    """Steps are measured by size class: 1 token, 2, 3-4, 5-8, ..."""
    return max(int(tokens) - 1, 0).bit_length()


def announced_seconds(info, blocks: int, tokens: int, rtt: float | None) -> float:
    """What a step of `tokens` tokens through `blocks` blocks should take at the server's announced
    speed: the first token at its single-token (inference) rate, the rest at its batched (forward) rate,
    plus the client's round trip to it."""
    fallback = getattr(info, "throughput", None) or DEFAULT_RPS
    inference = max(getattr(info, "inference_rps", None) or fallback, 1e-3)
    forward = max(getattr(info, "forward_rps", None) or fallback, 1e-3)
    compute = blocks * (1 / inference + max(tokens - 1, 0) / forward)
    link = rtt if rtt is not None and math.isfinite(rtt) else UNKNOWN_RTT_S
    return compute + max(link, 0.0)


@dataclass
class _Ewma:
    value: float
    count: int = 1
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))

    def __post_init__(self) -> None:
        self.recent.append(self.value)

    def add(self, seconds: float) -> None:
        self.value += EWMA_ALPHA * (seconds - self.value)
        self.count += 1
        self.recent.append(seconds)

    @property
    def typical(self) -> float:
        """The median of the latest steps: one step slow for a moment does not move it."""
        return statistics.median(self.recent)


@dataclass
class SpeedLedger:
    """What one client measured of servers' speed, and which it judged slow (with evidence)."""

    floor: float = DEADLINE_FLOOR_S
    times: dict[str, dict[int, _Ewma]] = field(default_factory=dict)  # peer -> size bucket -> step seconds
    slow: dict[str, dict] = field(default_factory=dict)  # peer -> evidence of the latest verdict
    marks: dict[str, tuple[float, float]] = field(default_factory=dict)  # peer -> (discount, wall time marked)
    stalls: Counter = field(default_factory=Counter)  # steps (and checks) a server let run past their deadline
    hedges: int = 0  # steps sent to a second server because the first was overdue
    hedges_won: int = 0  # ... where the second server answered first
    on_slow: list[Callable[[dict], None]] = field(default_factory=list)

    # --- measurements ----------------------------------------------------------------------------
    def observe(self, peer: str, tokens: int, seconds: float) -> None:
        if peer not in self.times and len(self.times) >= MAX_PEERS:  # a long-lived client: forget the oldest
            del self.times[next(iter(self.times))]
        buckets = self.times.setdefault(peer, {})
        bucket = size_bucket(tokens)
        if bucket in buckets:
            buckets[bucket].add(seconds)
        else:
            buckets[bucket] = _Ewma(seconds)

    def measured(self, peer: str, tokens: int) -> float | None:
        """The server's usual time for a step of this size; from the nearest size measured when this
        one is not (scaled up from smaller steps: an overestimate, never an underestimate)."""
        buckets = self.times.get(peer)
        if not buckets:
            return None
        want = size_bucket(tokens)
        if want in buckets:
            return buckets[want].value
        estimates = []
        for bucket, ewma in buckets.items():
            scale = 2 ** (want - bucket) if bucket < want else 1.0
            estimates.append(ewma.value * scale)
        return min(estimates)

    def expected(self, view, peer: str, blocks: int, tokens: int) -> float:
        measured = self.measured(peer, tokens)
        if measured is not None:
            return measured
        span = view.spans.get(peer)
        return announced_seconds(span.server_info if span else None, blocks, tokens, view.rtts.get(peer))

    def deadline(self, view, peer: str, blocks: int, tokens: int) -> float:
        """Seconds after which a step of this server is overdue (and hedged)."""
        seconds = self.floor + DEADLINE_FACTOR * self.expected(view, peer, blocks, tokens)
        return min(seconds, view.config.request_timeout)

    # --- verdicts --------------------------------------------------------------------------------
    def judge(self, view, peer: str, start: int, end: int, tokens: int) -> dict | None:
        """Evidence that `peer` is consistently slow for steps of this size (None if it is not): several
        times slower than its announcement, or than another server of the same blocks measured here."""
        ewma = self.times.get(peer, {}).get(size_bucket(tokens))
        if ewma is None or len(ewma.recent) < SLOW_MIN_STEPS:
            return None
        typical = ewma.typical
        span = view.spans.get(peer)
        if span is None or typical <= SLOW_MARGIN_S:  # (every verdict needs at least this much per step)
            return None
        blocks = end - start
        announced = announced_seconds(span.server_info, blocks, tokens, view.rtts.get(peer))
        if typical > SLOW_FACTOR * announced + SLOW_MARGIN_S:
            return self._evidence(view, peer, start, end, ewma, announced, "slower than it announces")
        for other, buckets in self.times.items():  # the servers measured here: few, unlike the swarm's spans
            theirs = buckets.get(size_bucket(tokens))
            other_span = view.spans.get(other)
            if other == peer or theirs is None or other_span is None or len(theirs.recent) < SLOW_MIN_STEPS:
                continue
            if other_span.start <= start and other_span.end >= end:
                per_block = theirs.typical * blocks / max(other_span.end - other_span.start, 1)
                if typical > SLOW_FACTOR * per_block + SLOW_MARGIN_S:
                    return self._evidence(
                        view, peer, start, end, ewma, announced, f"slower than server …{other[-6:]}", per_block
                    )
        return None

    def _evidence(self, view, peer, start, end, ewma, announced, why, compared=None) -> dict:
        reference = compared if compared is not None else announced
        typical = ewma.typical
        return {
            "peer_id": peer,
            "dht_prefix": view.dht_prefix,
            "blocks": [start, end],
            "kind": "slow",
            "measured_s": round(typical, 4),
            "announced_s": round(announced, 4),
            "times_slower": round(typical / max(reference, 1e-6), 1),
            "steps": ewma.count,
            "at": time.time(),
            "detail": f"{why}: steps take {typical:.3g} s here, {reference:.3g} s expected",
        }

    def stalled(self, view, peer: str, start: int, end: int, tokens: int, waited: float, what: str = "step") -> dict:
        """`peer` let a step (or a check) run past its deadline: count it, discount its speed, keep the evidence."""
        self.stalls[peer] += 1
        span = view.spans.get(peer)
        announced = announced_seconds(span.server_info if span else None, end - start, tokens, view.rtts.get(peer))
        evidence = {
            "peer_id": peer,
            "dht_prefix": view.dht_prefix,
            "blocks": [start, end],
            "kind": "stalled" if what == "step" else "stalled a check",
            "measured_s": round(waited, 3),  # at least: it had not answered yet
            "announced_s": round(announced, 4),
            "times_slower": round(waited / max(announced, 1e-6), 1),
            "steps": self.stalls[peer],
            "at": time.time(),
            "detail": (
                f"a {what} of {tokens} token{'' if tokens == 1 else 's'} had no answer after {waited:.3g} s "
                f"({announced:.3g} s expected)"
            ),
        }
        self.mark_slow(evidence)
        return evidence

    def mark_slow(self, evidence: dict) -> None:
        peer = evidence["peer_id"]
        factor = min(max(float(evidence.get("times_slower") or 1.0), SLOW_FACTOR), MAX_DISCOUNT)
        at = float(evidence.get("at") or time.time())
        self.marks[peer] = (max(self.discount(peer), factor), at)
        first = peer not in self.slow
        self.slow[peer] = evidence
        if first:
            logger.warning("slow server %s: %s", peer, evidence.get("detail", ""))
        for callback in self.on_slow:
            try:
                callback(evidence)
            except Exception:
                logger.exception("recording a slow server failed")

    def discount(self, peer: str, now: float | None = None) -> float:
        """What `peer`'s announced speed is divided by in routing: the factor it was found slower by,
        halving (towards 1) every DISCOUNT_HALF_LIFE_S, since a server slow once may only have been busy."""
        mark = self.marks.get(peer)
        if mark is None:
            return 1.0
        factor, at = mark
        age = max((time.time() if now is None else now) - at, 0.0)
        return 1.0 + (factor - 1.0) * 0.5 ** (age / DISCOUNT_HALF_LIFE_S)

    @property
    def discounts(self) -> dict[str, float]:
        """peer -> discount, for routing (choose_route)."""
        now = time.time()
        return {peer: self.discount(peer, now) for peer in self.marks}

    def summary(self, peer: str) -> dict:
        """For the node's swarm view: slow or not, and what was measured against what was announced."""
        evidence = self.slow.get(peer)
        buckets = self.times.get(peer, {})
        steps = sum(e.count for e in buckets.values())
        state = "slow" if evidence else ("measured" if steps else "unmeasured")
        decode = buckets.get(0)
        return {
            "state": state,
            "steps": steps,
            "step_s": round(decode.value, 4) if decode else None,
            "stalls": int(self.stalls[peer]),
            "evidence": evidence,
        }


def speed_of(view) -> SpeedLedger:
    if view.speed is None:
        view.speed = SpeedLedger(floor=view.config.step_deadline_floor)
    return view.speed
