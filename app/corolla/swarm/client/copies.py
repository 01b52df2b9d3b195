"""The client's own copy of a pushed step: sent only where the push brings the reply first.

With push (push.py) a server gets each step from the server before it. The client's copy of the same
step (same step_id: the server computes whichever arrives first and drops the other) is there for the
steps a push does not carry or carries late: the upstream server declined or failed to push, a push
refused after a failover, a link between the two servers longer than the client's. Sent at every step,
it costs the client a message per server and token and the server one more message to read and drop,
on the short links where push saves the least (issue 32).

So the client measures, per stream, which copy won: a Corolla server marks the reply to a step it took
from a push (`protocol.PUSHED_REPLY_METADATA`). Once `WARMUP` steps in a row with the copy sent at once
were won by the push, the client holds its copy back and sends it only if the reply has not come within
`FACTOR` times the typical pushed reply delay (clamped to [MIN_WAIT_S, MAX_WAIT_S]). A reply that misses
that wait, or a copy that wins, sends the stream back to copies at once until pushes win `WARMUP` in a
row again; every `RECHECK_EVERY` held-back steps one copy goes at once, so a push that became the slower
way is noticed. A copy sent late is exact all the same: the server computes the same step from it, and
the client's record of every span's inputs is its own either way.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WARMUP = 3  # pushes winning in a row (copies sent at once) before the copy is held back
FACTOR = 3.0
MIN_WAIT_S = 0.002  # a loaded machine's scheduling jitter: a shorter wait would send copies for nothing
MAX_WAIT_S = 0.5  # what a step whose push does not arrive costs at most, once
RECHECK_EVERY = 64  # held-back steps between two copies sent at once (does the push still win?)
SMOOTHING = 0.2  # weight of the newest delay in the typical one


@dataclass
class CopyCounts:
    """A client's pushed steps, all sessions together (benchmarks and tests read them)."""

    held_back: int = 0  # copies held back (the reply was awaited first)
    sent_late: int = 0  # ... and then sent, the reply not having come within the wait


@dataclass
class CopyTiming:
    """One stream's record of its pushed steps: which copy won lately, and how long pushed replies take."""

    typical_s: float | None = None  # smoothed delay of the replies that pushes brought
    _wins: deque = field(default_factory=lambda: deque(maxlen=WARMUP))  # did the push win, lately
    _held_back: int = 0

    def wait_s(self) -> float | None:
        """How long to wait for the pushed reply before sending the copy; None: send it at once."""
        if self.typical_s is None or len(self._wins) < WARMUP or not all(self._wins):
            return None
        if self._held_back and self._held_back % RECHECK_EVERY == 0:
            self._held_back += 1
            return None
        return min(max(FACTOR * self.typical_s, MIN_WAIT_S), MAX_WAIT_S)

    def observe(self, seconds: float, *, pushed: bool, held_back: bool, late: bool) -> None:
        """A pushed step's reply came `seconds` after the client had the step's inputs. `pushed`: the
        server took the step from the push; `held_back`: the copy was held back; `late`: ... and then
        sent, the reply not having come within the wait."""
        won = pushed and not late
        self._wins.append(won)
        if won:
            typical = self.typical_s
            self.typical_s = seconds if typical is None else (1 - SMOOTHING) * typical + SMOOTHING * seconds
        if held_back and won:
            self._held_back += 1
