"""Pushes between two Corolla servers on one long-lived stream per (sender, receiver) pair.

`rpc_push` is a unary call: p2pd opens a new libp2p stream for every push (protocol negotiation
included) and hands it to the receiver's Python through its control connection, with a future, a
queue and a task per call on each side. On loopback that is 0.72 ms one way against 0.38 ms for a
message on a stream already open (benchmarks/push_transport.py); every pushed hop of a chain pays it.

Between two Corolla servers the sender opens one stream (`protocol.PUSH_STREAM_NAME`) on its first
push to that peer and writes each later push on it as one message, hivemind's framing, no reply,
in the step's own turn of the event loop (no task, no wait: the bytes reach p2pd before the reply to
the client does). A
receiver serves it with the same stream registration as its other streaming RPCs (streams.py: length
checked before the body is read, every body read bounded in time, a shared byte budget, streams per
peer capped, peers out of refusals turned away) and takes each message through exactly rpc_push's
checks (push.py `_take_push`); a refused message is counted against the peer as a refused rpc_push
is, and the stream goes on. Stock Petals servers never see this stream: a sender uses it only for a
peer whose DHT record announces `corolla_version`, and pushes with rpc_push otherwise, or whenever
opening or writing the stream fails (the next push tries to open it again, after a pause).

Where both servers allow direct links, the sender then moves the stream onto one (direct_link.py: its
own sealed TCP connection, one socket each way instead of three and two daemons), opened in the
background while pushes go on over p2pd, and used from the next push on. Switching streams cannot
reorder a session's pushes: a session's next step exists only after the client has the last server's
reply to this one, which needs this push taken. Where the receiver cannot be reached directly (NAT, a
firewall, an older Corolla server), pushes stay on p2pd and that peer is not tried again for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from hivemind.dht import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from corolla.swarm import direct_link, protocol
from corolla.swarm.dht_records import get_module_infos

logger = logging.getLogger(__name__)

# one in use, one ending after the sender moved to a direct link, and one a sender reopening after a
# failure may briefly overlap
STREAMS_PER_PEER = 3
IDLE_S = 60.0  # a receiver ends a push stream that carried nothing for this long
OPEN_TIMEOUT_S = 5.0  # a push stream, or a direct link opened in the background (p2pd carries pushes meanwhile)
WRITE_TIMEOUT_S = 5.0
RETRY_AFTER_S = 30.0  # after a failed open, rpc_push to that peer for this long
KNOWN_FOR_S = 300.0  # how long a peer's DHT record's answer (Corolla or not) is trusted
UNKNOWN_FOR_S = 30.0  # a peer whose record was not found: asked again after this
MAX_PEERS = 256  # peers remembered (answers, open streams): clients choose whom a server pushes to
MAX_LOOKUPS = 4  # DHT lookups in flight at once
MAX_DIRECT_OPENING = 4  # direct links being opened in the background at once
MAX_ANSWER_BYTES = 64 * 1024  # the receiver's one answer: why it ended the stream

PeerLookup = Callable[[str, str], Awaitable[bool | None]]  # (peer base58, block uid) -> Corolla?


class CorollaPeers:
    """Which peers are Corolla servers, from their own DHT records (`corolla_version`), looked up in
    the background on the first push to a peer and remembered a while; unknown counts as stock."""

    def __init__(self, lookup: PeerLookup | None):
        self._lookup = lookup
        self._known: OrderedDict[PeerID, tuple[bool, float]] = OrderedDict()  # peer -> (corolla, expires)
        self._lookups: set[asyncio.Task] = set()

    def is_corolla(self, peer: PeerID, uid: str) -> bool:
        now = time.monotonic()
        known = self._known.get(peer)
        if known is not None and known[1] > now:
            return known[0]
        if self._lookup is not None and len(self._lookups) < MAX_LOOKUPS:
            self._remember(peer, known[0] if known else False, now + UNKNOWN_FOR_S)  # one lookup at a time
            task = asyncio.get_running_loop().create_task(self._look_up(peer, uid))
            self._lookups.add(task)
            task.add_done_callback(self._lookups.discard)
        return known[0] if known is not None else False

    async def _look_up(self, peer: PeerID, uid: str) -> None:
        try:
            corolla = await self._lookup(peer.to_base58(), uid)
        except Exception as exc:
            logger.debug("could not look up %s: %s", peer, protocol.shorten(str(exc)))
            return
        expires = time.monotonic() + (UNKNOWN_FOR_S if corolla is None else KNOWN_FOR_S)
        self._remember(peer, bool(corolla), expires)

    def _remember(self, peer: PeerID, corolla: bool, expires: float) -> None:
        self._known[peer] = (corolla, expires)
        self._known.move_to_end(peer)
        while len(self._known) > MAX_PEERS:
            self._known.popitem(last=False)

    def close(self) -> None:
        for task in self._lookups:
            task.cancel()


class _Link:
    """One open push stream to a peer (through p2pd, or `direct`); dead once the peer ends it or a write
    fails."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direct: bool = False):
        self.writer, self.direct = writer, direct
        self.watcher = asyncio.get_running_loop().create_task(self._watch(reader))

    async def _watch(self, reader: asyncio.StreamReader) -> None:
        """The receiver answers only to end the stream (an error message, then its close); an answer
        longer than `MAX_ANSWER_BYTES` is not read."""
        with contextlib.suppress(Exception):
            header = await reader.readexactly(1 + P2P.HEADER_LEN)
            length = int.from_bytes(header[1:], P2P.BYTEORDER)
            if header[:1] == P2P.ERROR_MARKER and length <= MAX_ANSWER_BYTES:
                error = RPCError.FromString(await asyncio.wait_for(reader.readexactly(length), WRITE_TIMEOUT_S))
                logger.debug("a push stream was ended: %s", protocol.shorten(error.message))
        self.close()

    @property
    def alive(self) -> bool:
        return not self.watcher.done() and not self.writer.is_closing()

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
        if not self.watcher.done() and self.watcher is not asyncio.current_task():
            self.watcher.cancel()


class PushLinks:
    """The sender's side: an open push stream per Corolla peer, opened on the first push, moved onto a
    direct link where one can be made (when `direct`), reused, reopened after a failure (not before
    `RETRY_AFTER_S`), all closed with `close()`."""

    def __init__(self, p2p: P2P, peers: CorollaPeers, direct: bool = False):
        self.p2p, self.peers, self.direct = p2p, peers, direct
        self._links: OrderedDict[PeerID, _Link] = OrderedDict()
        self._opening: dict[PeerID, asyncio.Lock] = {}
        self._retry_at: OrderedDict[PeerID, float] = OrderedDict()
        self._direct_failed = direct_link.FailedPeers()
        self._upgrading: dict[PeerID, asyncio.Task] = {}
        self._ending: set[asyncio.Task] = set()

    def write_now(self, peer: PeerID, request: runtime_pb2.ExpertRequest, uid: str) -> str | None:
        """Hand `request` to the open stream to `peer` at once, without a task or a wait (the bytes are
        in the socket before the caller's reply to its client): "direct" or "stream" (p2pd) if done;
        None where `send` must (the stream is not open yet, or its write buffer is not empty)."""
        if not self.peers.is_corolla(peer, uid):
            return None
        link = self._links.get(peer)
        if link is None or not link.alive or link.writer.transport.get_write_buffer_size():
            return None
        body = request.SerializeToString()
        link.writer.write(P2P.MESSAGE_MARKER + len(body).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + body)
        self._maybe_go_direct(peer, link)
        return "direct" if link.direct else "stream"

    async def send(self, peer: PeerID, request: runtime_pb2.ExpertRequest, uid: str) -> str | None:
        """Write `request` on the stream to `peer`: "direct" or "stream" (p2pd); None where the caller
        should use rpc_push (a stock or unknown peer, or a stream that could not be opened or written)."""
        if not self.peers.is_corolla(peer, uid):
            return None
        link = await self._link(peer)
        if link is None:
            return None
        try:
            await asyncio.wait_for(P2P.send_protobuf(request, link.writer), WRITE_TIMEOUT_S)
        except Exception as exc:
            logger.debug("push stream to %s failed: %s", peer, protocol.shorten(str(exc)))
            self._drop(peer, link)
            self._retry_later(peer)  # a peer that stops reading is not reopened at every step
            return None
        self._maybe_go_direct(peer, link)
        return "direct" if link.direct else "stream"

    async def _link(self, peer: PeerID) -> _Link | None:
        link = self._links.get(peer)
        if link is not None and link.alive:
            return link
        if self._retry_at.get(peer, 0.0) > time.monotonic():
            return None
        lock = self._opening.get(peer)
        if lock is None:
            if len(self._opening) >= MAX_PEERS:  # forget the locks nobody holds
                self._opening = {p: lock for p, lock in self._opening.items() if lock.locked()}
                if len(self._opening) >= MAX_PEERS:
                    return None
            lock = self._opening[peer] = asyncio.Lock()
        async with lock:
            link = self._links.get(peer)
            if link is not None and link.alive:
                return link
            return await self._open(peer)

    async def _open(self, peer: PeerID) -> _Link | None:
        try:
            _, reader, writer = await asyncio.wait_for(
                self.p2p.call_binary_stream_handler(peer, protocol.PUSH_STREAM_NAME), OPEN_TIMEOUT_S
            )
        except Exception as exc:
            logger.debug("could not open a push stream to %s: %s", peer, protocol.shorten(str(exc)))
            self._retry_later(peer)
            return None
        self._retry_at.pop(peer, None)
        return self._keep(peer, _Link(reader, writer))

    def _keep(self, peer: PeerID, link: _Link) -> _Link:
        """`link` becomes the stream to `peer`; the one it replaces ends after what was written on it."""
        old = self._links.pop(peer, None)
        if old is not None:
            self._end_later(old)
        self._links[peer] = link
        while len(self._links) > MAX_PEERS:
            self._links.popitem(last=False)[1].close()
        return link

    def _maybe_go_direct(self, peer: PeerID, link: _Link) -> None:
        """After a push on p2pd, open a direct link to `peer` in the background, if worth a try."""
        if not self.direct or link.direct or peer in self._upgrading or peer in self._direct_failed:
            return
        if len(self._upgrading) >= MAX_DIRECT_OPENING:
            return
        self._upgrading[peer] = asyncio.get_running_loop().create_task(self._go_direct(peer))

    async def _go_direct(self, peer: PeerID) -> None:
        try:
            opening = direct_link.open_stream(self.p2p, peer, direct_link.PUSH)
            reader, writer, _ = await asyncio.wait_for(opening, OPEN_TIMEOUT_S)
        except Exception as exc:
            self._direct_failed.add(peer, exc)
            return
        finally:
            self._upgrading.pop(peer, None)
        self._keep(peer, _Link(reader, writer, direct=True))

    def _end_later(self, link: _Link) -> None:
        task = asyncio.get_running_loop().create_task(_end(link))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    def _retry_later(self, peer: PeerID) -> None:
        self._retry_at[peer] = time.monotonic() + RETRY_AFTER_S
        self._retry_at.move_to_end(peer)
        while len(self._retry_at) > MAX_PEERS:
            self._retry_at.popitem(last=False)

    def _drop(self, peer: PeerID, link: _Link) -> None:
        link.close()
        if self._links.get(peer) is link:
            del self._links[peer]

    async def close(self) -> None:
        self.peers.close()
        for task in self._upgrading.values():
            task.cancel()
        self._upgrading.clear()
        links, self._links = list(self._links.values()), OrderedDict()
        await asyncio.gather(*(_end(link) for link in links), *list(self._ending))


async def _end(link: _Link) -> None:
    """The end-of-stream marker, then the close: the receiver takes what came before and ends quietly."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(P2P.send_protobuf(P2P.END_OF_STREAM, link.writer), 1.0)
    link.close()


def dht_lookup(dht: DHT) -> PeerLookup:
    """Whether a peer's record under `uid` (a block it serves) announces Corolla; None if not found."""

    async def lookup(peer: str, uid: str) -> bool | None:
        (module,) = await get_module_infos(dht, [uid])
        info = module.servers.get(peer)
        return None if info is None else bool(info.extra.get("corolla_version"))

    return lookup
