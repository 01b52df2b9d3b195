"""What a server does about peers whose requests it keeps refusing.

An honest peer is refused now and then (a stale route names blocks this server dropped, a busy server
turns a request away); a hostile one sends malformed or oversized requests as fast as it can, and each
costs the server a read, a parse and a reply. `RefusalBudget` gives each peer a bucket of refusals
(a burst, refilled at a steady rate): a peer whose bucket is empty is turned away at the door, before
anything it sent is read or decoded, until the bucket refills. Honest peers never come near the rate.

Turning a request away still costs the server: p2pd opens the stream and hands it over, the event loop
accepts it and answers. A peer that waits for each answer before sending the next request (as a client
does) would be answered at once and come straight back, hundreds of times a second. So a turned-away
request is held unanswered for `hold_s` first (`hold`): the peer's requests in flight then wait
instead of cycling, and its rate falls to a few a second. At most `max_held_per_peer` of one peer's
requests (and `max_held` in all) are held; past that they are turned away at once, so holding never
grows without bound however many requests a peer opens.

`RefusalLog` writes refusals to the log aggregated (the first at once, then one line per interval with
the count), so that a flood of bad requests does not become a flood of log lines.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Hashable

MAX_TRACKED_PEERS = 4096  # past this, peers whose bucket is full again are forgotten (they owe nothing)
HOLD_S = 2.0  # how long a turned-away request waits for its answer
# Only peers that used up their refusals are held, so the share protects no honest peer: it only splits
# the hold among several attackers. A peer keeps at most 64 streams open (streams.py) plus its unary calls.
MAX_HELD_PER_PEER = 128
MAX_HELD = 256  # each held stream keeps a socket open in this process and in p2pd


class RefusalBudget:
    def __init__(
        self,
        burst: float = 64,
        per_second: float = 16.0,
        on_turned_away: Callable[[], None] = lambda: None,
        on_held: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        hold_s: float = HOLD_S,
        max_held_per_peer: int = MAX_HELD_PER_PEER,
        max_held: int = MAX_HELD,
    ):
        self.burst, self.per_second, self.clock = float(burst), float(per_second), clock
        self.on_turned_away, self.on_held = on_turned_away, on_held
        self.hold_s, self.max_held_per_peer, self.max_held = hold_s, max_held_per_peer, max_held
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # peer -> (tokens, when counted)
        self._held: Counter = Counter()

    def _tokens(self, peer: Hashable, now: float) -> float:
        tokens, then = self._buckets.get(peer, (self.burst, now))
        return min(self.burst, tokens + (now - then) * self.per_second)

    def admits(self, peer: Hashable) -> bool:
        """False while `peer` has used up its refusals: its request is to be turned away unread."""
        if peer not in self._buckets:
            return True
        if self._tokens(peer, self.clock()) >= 1:
            return True
        self.on_turned_away()
        return False

    def charge(self, peer: Hashable) -> None:
        """One request of `peer` was refused. A peer that keeps many requests in flight can go into
        debt (down to minus one burst), which keeps it out for longer."""
        now = self.clock()
        self._buckets[peer] = (max(-self.burst, self._tokens(peer, now) - 1), now)
        if len(self._buckets) > MAX_TRACKED_PEERS:
            self._buckets = {p: (t, c) for p, (t, c) in self._buckets.items() if self._tokens(p, now) < self.burst}

    async def hold(self, peer: Hashable) -> None:
        """Wait `hold_s` before a turned-away request of `peer` is answered; return at once when that
        peer (or everyone) already has as many requests held as allowed."""
        if self._held[peer] >= self.max_held_per_peer or self._held.total() >= self.max_held:
            return
        self._held[peer] += 1
        self.on_held()
        try:
            await asyncio.sleep(self.hold_s)
        finally:
            self._held[peer] -= 1
            if not self._held[peer]:
                del self._held[peer]

    def held(self) -> int:
        return self._held.total()

    def tracked(self) -> int:
        return len(self._buckets)


class RefusalLog:
    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        lines_per_interval: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.logger, self.interval_s, self.lines_per_interval, self.clock = (
            logger,
            interval_s,
            lines_per_interval,
            clock,
        )
        self._unlogged: Counter = Counter()
        self._interval_start = -float("inf")
        self._lines = 0

    def refused(self, reason: str) -> None:
        """Log `reason` (already cut to a safe length) at once while this interval has lines to spare;
        past that, count it into one summary line at the end of the interval."""
        now = self.clock()
        if now - self._interval_start >= self.interval_s:
            if self._unlogged:
                top = "; ".join(f"{count} x {text}" for text, count in self._unlogged.most_common(3))
                self.logger.info("refused %d more requests, most often: %s", self._unlogged.total(), top)
                self._unlogged.clear()
            self._interval_start, self._lines = now, 0
        if self._lines < self.lines_per_interval:
            self._lines += 1
            self.logger.info("refused a request: %s", reason)
            return
        key = reason if reason in self._unlogged or len(self._unlogged) < 256 else "(other reasons)"
        self._unlogged[key] += 1
