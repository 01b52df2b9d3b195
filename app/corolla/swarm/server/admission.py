"""Admission: the caps and refusal accounting every RPC of the handler goes through first.

Every peer may be hostile: each holds at most so many sessions and queued forward/backward requests,
sessions that reserve no cache do not take the slots of those that do, and a peer that runs up too many
refusals is held a while and then turned away before its requests are read (refusals.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass, field

# hivemind tells streaming RPCs apart by `typing.AsyncIterator` annotations (not collections.abc's).
from typing import AsyncIterator  # noqa: UP035

from google.protobuf.message import Message
from hivemind.p2p import PeerID

from corolla.swarm import protocol
from corolla.swarm.server.packing import BadRequest
from corolla.swarm.server.streams import TURNED_AWAY


@dataclass(frozen=True)
class HandlerLimits:
    inference_max_length: int
    max_batch_size: int  # tokens (batch x length) per request
    max_open_sessions: int
    request_timeout: float
    session_timeout: float
    step_timeout: float
    max_sessions_per_peer: int = 32
    max_free_sessions: int = 64  # sessions with max_length=0: they reserve no cache, so they get their own cap
    max_queued_per_peer: int = 4  # forward/backward requests waiting for or on the compute thread
    max_queued: int = 64
    max_stream_messages: int = 256  # messages in one forward/backward stream
    # Refusals a peer may run up (a burst, refilled per second) before it is turned away unread;
    # None: never turned away.
    refusal_burst: int | None = 64
    refusals_per_s: float = 16.0


@dataclass
class PeerLoad:
    sessions: Counter = field(default_factory=Counter)
    queued: Counter = field(default_factory=Counter)


class AdmissionMixin:
    """Who may ask what of the handler, and how often: refusals charged per peer (refusals.py), peers
    turned away before their request is read, per-peer and overall caps on queued forward/backward
    requests and on open sessions.

    Uses the handler's `limits`, `stats`, `load`, `sessions`, `refusals` and `refusal_log`."""

    def _refused(self, exc: BaseException, peer: PeerID) -> None:
        self.stats.requests_refused += 1
        if self.refusals is not None:
            self.refusals.charge(peer)
        self.refusal_log.refused(protocol.shorten(str(exc) or type(exc).__name__, 300))

    def _count_turned_away(self) -> None:
        self.stats.requests_turned_away += 1

    def _count_held(self) -> None:
        self.stats.requests_held += 1

    async def _admit(self, peer: PeerID, request: Message) -> None:
        """Turn `peer` away before its `request` is looked at when it has run up too many refusals
        (after holding the request a while: refusals.py; it is in memory already, so it counts)."""
        if self.refusals is not None and not self.refusals.admits(peer):
            # A caller that gives up waiting has its call cancelled by p2pd. It ends as every refused
            # call ends all the same: hivemind forgets a unary call only when its handler returns or
            # raises an Exception, so a peer with short timeouts would otherwise grow that table forever.
            with contextlib.suppress(asyncio.CancelledError):
                await self.refusals.hold(peer, request.ByteSize())
            raise BadRequest(TURNED_AWAY)

    @contextlib.asynccontextmanager
    async def _queued(self, peer: PeerID) -> AsyncIterator[None]:
        """A forward/backward slot of `peer`: refused when the peer, or everyone, has too many queued."""
        if self.load.queued[peer] >= self.limits.max_queued_per_peer:
            raise BadRequest(
                "too many forward/backward requests in flight from one peer "
                f"(at most {self.limits.max_queued_per_peer})"
            )
        if self.load.queued.total() >= self.limits.max_queued:
            raise BadRequest(f"this server is busy: {self.limits.max_queued} forward/backward requests are queued")
        self.load.queued[peer] += 1
        try:
            yield
        finally:
            self.load.queued[peer] -= 1
            if not self.load.queued[peer]:
                del self.load.queued[peer]

    def _check_session_slot(self, peer: PeerID, session_id: str, reserving: bool) -> None:
        if session_id in self.sessions:
            raise BadRequest("this session id is in use")
        if self.load.sessions[peer] >= self.limits.max_sessions_per_peer:
            raise BadRequest(f"too many open sessions from one peer (at most {self.limits.max_sessions_per_peer})")
        same_kind = sum(1 for session in self.sessions.values() if session.reserving == reserving)
        cap = self.limits.max_open_sessions if reserving else self.limits.max_free_sessions
        if same_kind >= cap:
            kind = "sessions" if reserving else "sessions with max_length=0"
            raise BadRequest(f"this server already holds its maximum of {cap} {kind}")
