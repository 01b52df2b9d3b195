"""Server-to-server push (Petals' `next_servers`): sending a step's output on, and taking one in."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

# hivemind tells streaming RPCs apart by `typing.AsyncIterator` annotations (not collections.abc's).
from typing import AsyncIterator  # noqa: UP035

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from corolla.swarm import protocol, steptrace
from corolla.swarm.server.packing import BadRequest, read_step
from corolla.swarm.server.push_stream import IDLE_S, STREAMS_PER_PEER, CorollaPeers, PushLinks, dht_lookup
from corolla.swarm.server.streams import TURNED_AWAY, StreamLimits, add_stream_handler
from corolla.swarm.step_metadata import StepMetadata

logger = logging.getLogger(__name__)


class PushMixin:
    """Server-to-server push: a step's output sent on to the next server of the chain the client named
    (`next_servers`), and pushed steps accepted into this server's open sessions (rpc_push).

    Between two Corolla servers, pushes go on one long-lived stream per peer pair (push_stream.py);
    to any other server, and whenever that stream fails, by rpc_push.

    Uses the handler's `p2p`, `dht_prefix`, `limits`, `stats`, `sessions`, `refusals`, `refusal_log`,
    `_background`, `_chain`, `_refused` and `get_stub`."""

    dht = None  # the server's DHT, set before attach: where a peer's record says whether it is Corolla
    push_links: PushLinks | None = None
    dial_direct = False  # set before attach: move push streams onto direct links where they can be made

    def _push_stream_limits(self) -> StreamLimits:
        """The receiver's bounds on push streams: a pushed step's size, a few of them buffered, and
        `STREAMS_PER_PEER` streams per peer; refusals shared with the other RPCs."""
        largest = protocol.MAX_PUSH_BYTES + protocol.MAX_METADATA_BYTES + 64 * 1024
        return StreamLimits(
            max_message_bytes=largest,
            buffered_bytes=16 * largest,
            streams_per_peer=STREAMS_PER_PEER,
            refusals=self.refusals,
            refusal_log=self.refusal_log,
        )

    async def _attach_push_stream(self, p2p: P2P):
        """Serve push streams; returns the stream handle (a direct link hands its connections to it too)."""
        lookup = dht_lookup(self.dht) if self.dht is not None else None
        self.push_links = PushLinks(p2p, CorollaPeers(lookup), direct=self.dial_direct)
        limits = self._push_stream_limits()
        name, request_type = protocol.PUSH_STREAM_NAME, runtime_pb2.ExpertRequest
        return await add_stream_handler(p2p, name, self.push_stream, request_type, limits=limits)

    async def _detach_push_stream(self, p2p: P2P) -> None:
        if self.push_links is not None:
            await self.push_links.close()
        with contextlib.suppress(Exception):
            await p2p.remove_binary_stream_handler(protocol.PUSH_STREAM_NAME)

    def _maybe_push(self, out: runtime_pb2.Tensor, request, metadata: StepMetadata) -> bool:
        """Send this step's output to the next server of the chain when the step names one.

        The pushed copy carries this step's own trailing tensors (Petals' servers send the first
        request's, which is wrong for a step that reorders beams); a step with deep prompts or a padding
        mask is never pushed, as in Petals (those are per span, the next server needs its own). `out` is
        the serialized output. Returns True where the push went to a task, which needs one turn of the
        event loop to hand its bytes over before the caller replies to its client; False where it was
        written at once or not sent at all."""
        next_servers = metadata.next_servers  # well-formed or None (read_step)
        if not next_servers or self.p2p is None:
            return False
        if len(request.tensors) > 3 or (len(request.tensors) > 1 and _numel(request.tensors[1]) > 0):
            return False
        if len(out.buffer) > protocol.MAX_PUSH_BYTES:  # a long prompt's output: rpc_push is unary, p2pd would refuse it
            return False
        peer_b58, next_session, start, end = next_servers[0]
        try:
            uid = protocol.chain_uids(self.dht_prefix, start, end)
            pushed = metadata.pushed_on(next_session, next_servers[1:])
            request = runtime_pb2.ExpertRequest(uid=uid, tensors=[out, *request.tensors[1:]], metadata=pushed.pack())
            peer = _peer_id(peer_b58)
        except Exception as exc:  # a malformed next_servers entry only disables the optimisation
            logger.debug("not pushing: %s", protocol.shorten(str(exc)))
            return False
        self.stats.pushes_sent += 1
        first_uid = uid.split(protocol.CHAIN_DELIMITER, 1)[0]  # where the peer's DHT record says what it runs
        via = self.push_links.write_now(peer, request, first_uid) if self.push_links is not None else None
        if via is not None:
            steptrace.mark("push_send", step=metadata.step_id, via=via)
            self._count_on_stream(via)
            return False  # written: nothing left to do (and the open stream keeps it in order)
        task = asyncio.create_task(self._push(peer, request, first_uid, metadata.step_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return True

    async def _push(self, peer: PeerID, request: runtime_pb2.ExpertRequest, uid: str, step: str | None) -> None:
        try:
            if self.push_links is not None:
                via = await self.push_links.send(peer, request, uid)
                if via is not None:
                    steptrace.mark("push_send", step=step, via=via)
                    self._count_on_stream(via)
                    return
            stub = self.get_stub(self.p2p, peer)
            steptrace.mark("push_send", step=step, via="rpc_push")
            await stub.rpc_push(request, timeout=self.limits.request_timeout)
            steptrace.mark("push_acked")
        except Exception as exc:
            logger.debug("push to %s failed: %s", peer, protocol.shorten(str(exc)))

    def _count_on_stream(self, via: str) -> None:
        self.stats.pushes_sent_on_stream += 1
        if via == "direct":
            self.stats.pushes_sent_direct += 1

    def _take_push(self, request: runtime_pb2.ExpertRequest, pusher: PeerID) -> None:
        """Queue a pushed step into the session it names: only a session open here, over the same
        blocks, and from one pusher per session (the upstream server the client names, else the first
        peer that pushes to it). BadRequest otherwise."""
        metadata = read_step(request.metadata)
        steptrace.mark("push_received", step=metadata.step_id)
        self._chain(request.uid)
        session = self.sessions.get(metadata.session_id) if metadata.session_id is not None else None
        if session is None:
            raise BadRequest("rpc_push: no open session with this id")
        if request.uid != session.chain:
            raise BadRequest("rpc_push: these blocks are not the session's")
        if session.pusher is not None and session.pusher != pusher:
            raise BadRequest("rpc_push: another peer pushes to this session")
        if session.pushes.full():
            raise BadRequest("rpc_push: the session's queue of pushed steps is full")
        session.pusher = pusher
        session.pushes.put_nowait((request, metadata))
        self.stats.pushes_received += 1

    async def push_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A Corolla server's pushes, one per message, each taken as rpc_push takes one: a refused
        message is charged to the peer and dropped, and the stream goes on until the sender ends it,
        it idles `IDLE_S`, or the peer runs out of refusals. Nothing is answered (but why it ended)."""
        peer = context.remote_id
        while True:
            try:
                async with asyncio.timeout(IDLE_S):  # no task per message, unlike wait_for
                    request = await anext(requests)
            except (StopAsyncIteration, TimeoutError):
                return
            if self.refusals is not None and not self.refusals.admits(peer):  # admits() counts it
                raise BadRequest(TURNED_AWAY)
            try:
                self._take_push(request, peer)
            except BadRequest as exc:
                self._refused(exc, peer)
                continue
            self.stats.pushes_received_on_stream += 1
        yield  # an async generator (the stream's replies), though it never answers


def follow_named_upstream(session, metadata: StepMetadata) -> None:
    """A Corolla client names the server that pushes into this session (`corolla_upstream`), so after a
    failover the replacement upstream may push here; without it, the first peer to push keeps the role."""
    named = metadata.upstream
    if named is not None:
        with contextlib.suppress(Exception):
            session.pusher = _peer_id(named)  # every client message names it: decoded once


@functools.lru_cache(maxsize=256)
def _peer_id(b58: str) -> PeerID:
    """Decoding base58 takes ~50 us a step: the few next servers and named upstreams are remembered."""
    return PeerID.from_base58(b58)


def _numel(tensor: runtime_pb2.Tensor) -> int:
    count = 1
    for dim in tensor.size:
        count *= dim
    return count
