"""What a server does about peers whose requests it keeps refusing.

An honest peer is refused now and then (a stale route names blocks this server dropped, a busy server
turns a request away); a hostile one sends malformed or oversized requests as fast as it can, and each
costs the server a read, a parse and a reply. `RefusalBudget` gives each peer a bucket of refusals
(a burst, refilled at a steady rate): a peer whose bucket is empty is turned away at the door, before
anything it sent is read or decoded, until the bucket refills. Honest peers never come near the rate.

Turning a request away still costs the server: p2pd opens the stream and hands it over, the event loop
accepts it and answers. A peer that waits for each answer before sending the next request (as a client
does) would be answered at once and come straight back, hundreds of times a second. So a turned-away
request is held unanswered first (`hold`): the peer's requests in flight then wait instead of cycling.
- The hold grows with how long the peer has been out of refusals: `hold_s` at first, then as long as
  the peer has been out, up to `max_hold_s`. A peer that erred a while waits a few seconds; one that
  keeps hundreds of requests in flight has them come back a few times a minute.
- Every turned-away request is charged too, so a peer that keeps sending while it is out stays out:
  only a pause lets its bucket refill.
- Holding is bounded, and past the bounds requests are turned away at once: `max_held_per_peer` of
  one peer's requests, `max_held` in all (no more than the open-file limit allows: `held_cap`), and
  `max_held_bytes` of unary requests, which are already in memory when they are turned away. A
  turned-away stream has not been read: while it is held, what its caller sends is read and dropped
  (streams.py), and the hold ends as soon as the caller hangs up.
- So a peer with more requests in flight than the hold takes still has the rest answered at once, and
  each of those costs the server as much as before; SECURITY.md says where that starts.

`RefusalLog` writes refusals to the log aggregated (the first at once, then one line per interval with
the count), so that a flood of bad requests does not become a flood of log lines.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable

MAX_TRACKED_PEERS = 4096  # past this, peers whose bucket is full again are forgotten (they owe nothing)
HOLD_S = 2.0  # how long a turned-away request waits for its answer at first
MAX_HOLD_S = 30.0  # and at most, once its peer has been out of refusals that long
# Measured per held request: a stream costs ~9 KB in this process and ~38 KB in p2pd, a small unary
# call ~4 KB and ~16 KB; at this cap both stay well under 64 MiB.
MAX_HELD = 1024
# Only peers that used up their refusals are held, so a per-peer share would protect no honest peer (it
# would only split the hold among several attackers): one peer may take all of it.
MAX_HELD_PER_PEER = MAX_HELD
# A held unary request is already read whole, up to 4 MiB each: hivemind keeps three copies of it in
# this process while it is held, p2pd one. So holding is bounded in those bytes too; past this, requests
# are answered at once.
MAX_HELD_BYTES = 8 * 1024 * 1024


def held_cap(open_file_limit: int, most: int = MAX_HELD) -> int:
    """How many requests may be held in all when this process may open `open_file_limit` files: a held
    stream keeps one socket open here (and one in p2pd, which has its own limit). Half the limit is
    left to everything else (sessions, the DHT, the model's files)."""
    return max(64, min(most, open_file_limit // 2))


class RefusalBudget:
    def __init__(
        self,
        burst: float = 64,
        per_second: float = 16.0,
        on_turned_away: Callable[[], None] = lambda: None,
        on_held: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        hold_s: float = HOLD_S,
        max_hold_s: float = MAX_HOLD_S,
        max_held_per_peer: int = MAX_HELD_PER_PEER,
        max_held: int = MAX_HELD,
        max_held_bytes: int = MAX_HELD_BYTES,
    ):
        self.burst, self.per_second, self.clock = float(burst), float(per_second), clock
        self.on_turned_away, self.on_held = on_turned_away, on_held
        self.hold_s, self.max_hold_s = hold_s, max(hold_s, max_hold_s)
        self.max_held_per_peer, self.max_held, self.max_held_bytes = max_held_per_peer, max_held, max_held_bytes
        self._held_bytes = 0
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # peer -> (tokens, when counted)
        self._out_since: dict[Hashable, float] = {}  # peer -> when it ran out of refusals this time
        self._held: Counter = Counter()

    def _tokens(self, peer: Hashable, now: float) -> float:
        tokens, then = self._buckets.get(peer, (self.burst, now))
        return min(self.burst, tokens + (now - then) * self.per_second)

    def admits(self, peer: Hashable) -> bool:
        """False while `peer` has used up its refusals: its request is to be turned away unread (and is
        charged, so that a peer sending while it is out stays out)."""
        if peer not in self._buckets:
            return True
        now = self.clock()
        if self._tokens(peer, now) >= 1:
            self._out_since.pop(peer, None)
            return True
        self._out_since.setdefault(peer, now)
        self.charge(peer)
        self.on_turned_away()
        return False

    def charge(self, peer: Hashable) -> None:
        """One request of `peer` was refused. A peer that keeps many requests in flight can go into
        debt (down to minus one burst), which keeps it out for longer."""
        now = self.clock()
        self._buckets[peer] = (max(-self.burst, self._tokens(peer, now) - 1), now)
        if len(self._buckets) > MAX_TRACKED_PEERS:
            self._buckets = {p: (t, c) for p, (t, c) in self._buckets.items() if self._tokens(p, now) < self.burst}
            self._out_since = {p: t for p, t in self._out_since.items() if p in self._buckets}

    def hold_time(self, peer: Hashable) -> float:
        """How long a turned-away request of `peer` waits: `hold_s`, or as long as the peer has been
        out of refusals, up to `max_hold_s`; then up to half as long again, at random, so that
        requests held together are not all answered in the same instant (and sent again all at once)."""
        now = self.clock()
        out_for = now - self._out_since.get(peer, now)
        return min(self.max_hold_s, max(self.hold_s, out_for)) * random.uniform(1.0, 1.5)

    async def hold(
        self, peer: Hashable, nbytes: int = 0, wait: Callable[[float], Awaitable[object]] = asyncio.sleep
    ) -> None:
        """Hold a turned-away request of `peer` (`nbytes`: what of it is already in memory) for
        `hold_time(peer)`, by `wait(seconds)`, which may end sooner (a stream whose caller hung up).
        Return at once when that peer, or everyone, already has as many requests or bytes held as
        allowed."""
        if (
            self._held[peer] >= self.max_held_per_peer
            or self._held.total() >= self.max_held
            or self._held_bytes + nbytes > self.max_held_bytes
        ):
            return
        self._held[peer] += 1
        self._held_bytes += nbytes
        self.on_held()
        try:
            await wait(self.hold_time(peer))
        finally:
            self._held_bytes -= nbytes
            self._held[peer] -= 1
            if not self._held[peer]:
                del self._held[peer]

    def held(self) -> int:
        return self._held.total()

    def held_bytes(self) -> int:
        return self._held_bytes

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
