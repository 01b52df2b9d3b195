"""Direct links: a Corolla client's inference stream to a Corolla server over a TCP connection of its
own instead of through both peers' p2pd daemons.

Why: through p2pd every message crosses three sockets and two daemon processes each way (client ->
its p2pd -> the server's p2pd -> server). On a short link (one computer, a LAN) that is most of a hop's
time; a direct connection crosses one socket.

It stays as private and as guarded as the libp2p stream it replaces:
- The client first asks the server for a ticket over libp2p (`rpc_direct_ticket`: authenticated by the
  server's peer id, encrypted). The ticket carries the server's direct addresses, a one-time id and a
  fresh 32-byte secret. Only the peer that answered over libp2p knows the secret, so whoever completes
  the TCP handshake with it is that peer; a stolen address or a replayed id gets nothing.
- The server binds the connection to the peer id that asked for the ticket and hands it to the very
  handler a libp2p stream reaches (server/streams.py): per-peer stream counts, refusal budgets, message
  limits and timeouts are the same.
- Both directions are sealed with ChaCha20-Poly1305 (one key per direction, derived with HKDF from the
  secret and both sides' nonces; a counter as the nonce): nobody on the path reads or alters hidden
  states, and a frame replayed, dropped or reordered fails its check and ends the connection.
- A sealed frame is at most 1 MiB; inside is hivemind's framing, read by the same bounded readers as a
  libp2p stream. The handshake is bounded in time; tickets are few per peer, short-lived and single-use.

Stock Petals peers never see any of this: a client asks only servers that announce `corolla_version`, and
where a direct connection cannot be made (NAT, a firewall, an older Corolla server) it uses libp2p.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

logger = logging.getLogger(__name__)

TICKET_RPC = "CorollaDirectLink.rpc_direct_ticket"
# Which of the server's streams a link carries, asked for in the ticket request (ExpertUID.uid) and named
# again in the reply: a client's inference stream, or another server's pushes (server/push_stream.py).
INFERENCE = "inference"
PUSH = "push"
MAGIC = b"CRLDIR1\n"
ID_BYTES, NONCE_BYTES, SECRET_BYTES, TAG_BYTES = 16, 16, 32, 16
HELLO_BYTES = len(MAGIC) + ID_BYTES + NONCE_BYTES
MAX_PLAIN_FRAME = 1024 * 1024  # plaintext per sealed frame; larger writes go in several
LENGTH_BYTES = 4
READY = b"corolla direct link ready"
HANDSHAKE_TIMEOUT_S = 5.0
TICKET_TTL_S = 30.0
TICKETS_PER_PEER = 8
MAX_TICKETS = 1024
MAX_HANDSHAKING = 64  # connections not yet through the handshake, all together
MAX_HOSTS = 8
MAX_TICKET_REPLY_BYTES = 4096
READER_LIMIT = 256 * 1024  # plaintext a connection buffers before it stops reading the socket
RETRY_AFTER_S = 300.0  # a client tries a server's direct link again this long after one failed
SPARE_TTL_S = 60.0  # a spare link unused this long is not used (nor past half the server's idle limit)
SPARE_OPEN_TIMEOUT_S = 10.0
MAX_SPARES = 64
MAX_REMEMBERED = 1024


class DirectLinkError(ConnectionError):
    """A direct link could not be made or broke (the caller falls back to libp2p or fails the stream)."""


def _keys(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> tuple[bytes, bytes]:
    """(client-to-server key, server-to-client key)."""
    material = HKDF(hashes.SHA256(), 64, salt=client_nonce + server_nonce, info=b"corolla direct link v1").derive(
        secret
    )
    return material[:32], material[32:]


class _Sealer:
    """One direction's AEAD with its frame counter."""

    def __init__(self, key: bytes):
        self._aead, self._counter = ChaCha20Poly1305(key), 0

    def _nonce(self) -> bytes:
        self._counter += 1
        return bytes(4) + self._counter.to_bytes(8, "big")

    def seal(self, plain: bytes) -> bytes:
        sealed = self._aead.encrypt(self._nonce(), plain, None)
        return len(sealed).to_bytes(LENGTH_BYTES, "big") + sealed

    def open(self, sealed: bytes) -> bytes:
        return self._aead.decrypt(self._nonce(), sealed, None)


class SealedWriter:
    """The writing half of a direct link, with the part of asyncio.StreamWriter's interface that the
    stream code uses (write, drain, close, is_closing, wait_closed)."""

    def __init__(self, transport: asyncio.Transport, protocol: SealedProtocol, sealer: _Sealer):
        self.transport, self._protocol, self._sealer = transport, protocol, sealer

    def write(self, data: bytes) -> None:
        if self.transport.is_closing():
            return  # as a StreamWriter: the next drain() reports the closed connection
        view = memoryview(data)
        for start in range(0, max(len(view), 1), MAX_PLAIN_FRAME):
            self.transport.write(self._sealer.seal(bytes(view[start : start + MAX_PLAIN_FRAME])))

    async def drain(self) -> None:
        if self.transport.is_closing():
            await asyncio.sleep(0)  # let connection_lost run, as StreamWriter.drain does
            raise ConnectionResetError("the direct link is closed")
        await self._protocol.writable()

    def close(self) -> None:
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    async def wait_closed(self) -> None:
        await self._protocol.closed


class SealedProtocol(asyncio.Protocol):
    """Both ends of a direct link: the handshake, then sealed frames in, plaintext to a StreamReader.

    `on_hello(ticket_id)` (server side) returns the ticket's (secret, on_open) or None; the client side
    gives its secret and hello up front."""

    def __init__(
        self,
        *,
        on_hello: Callable[[bytes], tuple[bytes, Callable[[asyncio.StreamReader, SealedWriter], None]] | None]
        | None = None,
        client_hello: tuple[bytes, bytes] | None = None,  # (ticket id, secret)
        on_handshake_end: Callable[[], None] | None = None,
    ):
        loop = asyncio.get_running_loop()
        self._on_hello, self._client_hello = on_hello, client_hello
        self._on_handshake_end = on_handshake_end
        self._handshaking = True
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._in: _Sealer | None = None
        self.reader = asyncio.StreamReader(limit=READER_LIMIT, loop=loop)
        self.writer: SealedWriter | None = None
        self.ready: asyncio.Future = loop.create_future()  # the client's: set once the server proved the secret
        # Only the client's chosen connection awaits `ready`: a server's, or a client's that lost the race
        # to another address, fails it unread (asyncio would log "exception was never retrieved").
        self.ready.add_done_callback(_read_outcome)
        self.closed: asyncio.Future = loop.create_future()
        self._client_nonce = os.urandom(NONCE_BYTES)
        self._paused = False
        self._drain_waiters: list[asyncio.Future] = []
        self._deadline: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self.reader.set_transport(transport)
        self._deadline = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT_S, self._handshake_timed_out)

    def send_hello(self) -> None:
        """The client's: sent on the one connection it chose (a ticket is good for one hello)."""
        ticket_id, _ = self._client_hello
        self._transport.write(MAGIC + ticket_id + self._client_nonce)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            if self.writer is None and not self._handshake():
                return
            self._open_frames()
        except (InvalidTag, DirectLinkError) as exc:
            self._fail(DirectLinkError(f"direct link: {exc or 'a frame failed its integrity check'}"))

    def eof_received(self) -> bool:
        return False  # close the connection: a direct link has no half-closed state

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_handshake()
        if exc is None:
            self.reader.feed_eof()
        else:
            self.reader.set_exception(DirectLinkError(f"direct link lost: {exc}"))
        if not self.ready.done():
            self.ready.set_exception(DirectLinkError(f"the server closed the direct link ({exc or 'no reason'})"))
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake_writers()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writers()

    # --- the link ------------------------------------------------------------------------------------
    async def writable(self) -> None:
        if self._paused and not self._transport.is_closing():
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter
        if self._transport.is_closing():
            raise ConnectionResetError("the direct link is closed")

    def _wake_writers(self) -> None:
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    def _handshake(self) -> bool:
        """True once the link is open (the rest of the buffer is sealed frames)."""
        if self._client_hello is None:  # the server: a hello, then the proof that it holds the secret
            if len(self._buffer) < HELLO_BYTES:
                return False
            hello, self._buffer = bytes(self._buffer[:HELLO_BYTES]), self._buffer[HELLO_BYTES:]
            if not hello.startswith(MAGIC):
                raise DirectLinkError("not a direct link hello")
            found = self._on_hello(hello[len(MAGIC) : len(MAGIC) + ID_BYTES])
            if found is None:
                raise DirectLinkError("an unknown or expired ticket")
            secret, on_open = found
            server_nonce = os.urandom(NONCE_BYTES)
            c2s, s2c = _keys(secret, hello[len(MAGIC) + ID_BYTES :], server_nonce)
            self._in, out = _Sealer(c2s), _Sealer(s2c)
            self._transport.write(server_nonce + out.seal(READY))
            self._open(out)
            on_open(self.reader, self.writer)
            return True
        # the client: the server's nonce and its first sealed frame, which must open to READY
        if len(self._buffer) < NONCE_BYTES + LENGTH_BYTES:
            return False
        length = int.from_bytes(self._buffer[NONCE_BYTES : NONCE_BYTES + LENGTH_BYTES], "big")
        if length != len(READY) + TAG_BYTES:
            raise DirectLinkError("the server's handshake is malformed")
        end = NONCE_BYTES + LENGTH_BYTES + length
        if len(self._buffer) < end:
            return False
        _, secret = self._client_hello
        c2s, s2c = _keys(secret, self._client_nonce, bytes(self._buffer[:NONCE_BYTES]))
        self._in = _Sealer(s2c)
        if self._in.open(bytes(self._buffer[NONCE_BYTES + LENGTH_BYTES : end])) != READY:
            raise DirectLinkError("the server's handshake is malformed")
        del self._buffer[:end]
        self._open(_Sealer(c2s))
        self.ready.set_result(None)
        return True

    def _open(self, out: _Sealer) -> None:
        self.writer = SealedWriter(self._transport, self, out)
        self._end_handshake()

    def _end_handshake(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._handshaking:
            self._handshaking = False
            if self._on_handshake_end is not None:
                self._on_handshake_end()

    def _open_frames(self) -> None:
        buffer = self._buffer
        offset = 0
        while len(buffer) - offset >= LENGTH_BYTES:
            length = int.from_bytes(buffer[offset : offset + LENGTH_BYTES], "big")
            if not TAG_BYTES <= length <= MAX_PLAIN_FRAME + TAG_BYTES:
                raise DirectLinkError(f"a sealed frame of {length} bytes")
            end = offset + LENGTH_BYTES + length
            if len(buffer) < end:
                break
            self.reader.feed_data(self._in.open(bytes(buffer[offset + LENGTH_BYTES : end])))
            offset = end
        if offset:
            del buffer[:offset]

    def _handshake_timed_out(self) -> None:
        self._deadline = None
        if self.writer is None:
            self._fail(DirectLinkError("the direct link's handshake took too long"))

    def _fail(self, exc: DirectLinkError) -> None:
        logger.debug("%s", exc)
        self.reader.set_exception(exc)
        if not self.ready.done():
            self.ready.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()


def _read_outcome(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


# --- the server's side ---------------------------------------------------------------------------
@dataclass
class _Ticket:
    peer: PeerID
    secret: bytes
    expires: float
    stream: str


@dataclass
class DirectStreamInfo:
    """What the stream handler reads of a libp2p StreamInfo: who is calling."""

    peer_id: PeerID


StreamHandle = Callable[[DirectStreamInfo, asyncio.StreamReader, SealedWriter], Awaitable[None]]


class DirectLinkServer:
    """Listens for direct links and hands each to the handle of the stream its ticket was asked for
    (`handles`: stream name -> handle), as the ticket's peer's stream."""

    def __init__(
        self,
        handles: dict[str, StreamHandle],
        bind_host: str,
        port: int,
        advertised_hosts: list[str],
        idle_s: float = 300.0,  # how long a new link may wait for its first message (the step timeout)
    ):
        self._handles, self._bind_host, self._port, self._idle_s = dict(handles), bind_host, port, idle_s
        self._advertised = advertised_hosts
        self._tickets: OrderedDict[bytes, _Ticket] = OrderedDict()
        self._server: asyncio.Server | None = None
        self._handshaking = 0
        self._tasks: set[asyncio.Task] = set()
        self.port: int | None = None

    async def start(self, p2p: P2P) -> None:
        await self.listen()
        await p2p.add_protobuf_handler(TICKET_RPC, self.rpc_direct_ticket, runtime_pb2.ExpertUID)

    async def listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_protocol, host=self._bind_host, port=self._port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self, p2p: P2P | None) -> None:
        if p2p is not None:
            with contextlib.suppress(Exception):
                await p2p.remove_protobuf_handler(TICKET_RPC)
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tickets.clear()

    async def rpc_direct_ticket(self, request: runtime_pb2.ExpertUID, context) -> runtime_pb2.ExpertInfo:
        stream = request.uid or INFERENCE  # Corolla clients of the first version named none
        if stream not in self._handles:
            raise DirectLinkError(f"no direct links for stream {stream[:32]!r}")
        ticket_id, secret = self.issue(context.remote_id, stream)
        reply = {
            "stream": stream,
            "hosts": self._advertised,
            "port": self.port,
            "ticket": ticket_id,
            "secret": secret,
            "idle_s": float(self._idle_s),
        }
        return runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps(reply))

    def issue(self, peer: PeerID, stream: str = INFERENCE) -> tuple[bytes, bytes]:
        """A new ticket for `peer`; its oldest ones (and the oldest of all) make room."""
        now = time.monotonic()
        while self._tickets and next(iter(self._tickets.values())).expires < now:
            self._tickets.popitem(last=False)
        own = [key for key, ticket in self._tickets.items() if ticket.peer == peer]
        for key in own[: max(0, len(own) - TICKETS_PER_PEER + 1)]:
            del self._tickets[key]
        while len(self._tickets) >= MAX_TICKETS:
            self._tickets.popitem(last=False)
        ticket_id, secret = os.urandom(ID_BYTES), os.urandom(SECRET_BYTES)
        self._tickets[ticket_id] = _Ticket(peer, secret, now + TICKET_TTL_S, stream)
        return ticket_id, secret

    def _new_protocol(self) -> asyncio.Protocol:
        if self._handshaking >= MAX_HANDSHAKING:
            return _Refuse()
        self._handshaking += 1  # until the protocol's handshake ends, one way or another
        return SealedProtocol(on_hello=self._take, on_handshake_end=self._handshake_ended)

    def _handshake_ended(self) -> None:
        self._handshaking -= 1

    def _take(self, ticket_id: bytes):
        ticket = self._tickets.pop(ticket_id, None)
        if ticket is None or ticket.expires < time.monotonic():
            return None

        def on_open(reader: asyncio.StreamReader, writer: SealedWriter) -> None:
            handle = self._handles[ticket.stream]
            task = asyncio.get_running_loop().create_task(self._serve(handle, ticket.peer, reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return ticket.secret, on_open

    async def _serve(
        self, handle: StreamHandle, peer: PeerID, reader: asyncio.StreamReader, writer: SealedWriter
    ) -> None:
        try:
            await handle(DirectStreamInfo(peer), reader, writer)
        except Exception:
            logger.debug("a direct link's stream failed", exc_info=True)
        finally:
            writer.close()


class _Refuse(asyncio.Protocol):
    """Too many handshakes at once: close at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()


def advertised_hosts(host_maddrs: list[str], visible_maddrs: list[str]) -> list[str]:
    """The IP addresses a direct link may be tried at: the ones this peer is seen at (its announced
    addresses, when it has any: where it told peers to reach it, which is where the path to it runs),
    else the host it listens on (when it names one); at most MAX_HOSTS."""
    hosts = _ip_hosts(visible_maddrs)
    return (hosts or _ip_hosts(host_maddrs))[:MAX_HOSTS]


def _ip_hosts(maddrs: list[str]) -> list[str]:
    hosts: list[str] = []
    for maddr in maddrs:
        parts = str(maddr).split("/")
        if "p2p-circuit" in parts:
            continue  # the relay's address, not ours
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            host = parts[2]
            if host not in hosts and not ipaddress.ip_address(host).is_unspecified:
                hosts.append(host)
    return hosts


def direct_bind_host(host_maddrs: list[str]) -> str:
    """Where the direct link listens: the IP host of the first IP multiaddr, as written (0.0.0.0 is every
    IPv4 interface: one socket, so one port; asyncio given no host binds IPv4 and IPv6 each on a port
    of its own, and the ticket could name the other family's)."""
    for maddr in host_maddrs:
        parts = str(maddr).split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            return parts[2]
    return "127.0.0.1"


def same_family(hosts: list[str], bind_host: str) -> list[str]:
    """The advertised hosts a listener on `bind_host` answers at (its IP version only)."""
    version = ipaddress.ip_address(bind_host).version
    return [host for host in hosts if ipaddress.ip_address(host).version == version]


# --- the client's side ---------------------------------------------------------------------------
@dataclass
class Ticket:
    hosts: list[str]
    port: int
    ticket_id: bytes
    secret: bytes
    idle_s: float = 0.0  # how long the server keeps a link that has not sent its first message (0: unknown)


def read_ticket(serialized: bytes, stream: str = INFERENCE) -> Ticket:
    """A server's ticket reply for `stream`, checked field by field (it comes from a peer: anything may
    be in it). A reply that names no stream is a first-version server's: good for inference only."""
    if len(serialized) > MAX_TICKET_REPLY_BYTES:
        raise DirectLinkError("the ticket reply is too long")
    try:
        reply = MSGPackSerializer.loads(serialized)
    except Exception as exc:
        raise DirectLinkError("the ticket reply does not decode") from exc
    if not isinstance(reply, dict):
        raise DirectLinkError("the ticket reply is not a map")
    if reply.get("stream", INFERENCE) != stream:
        raise DirectLinkError(f"the ticket is not for the {stream} stream")
    hosts, port = reply.get("hosts"), reply.get("port")
    ticket_id, secret = reply.get("ticket"), reply.get("secret")
    if not isinstance(hosts, list) or not 1 <= len(hosts) <= MAX_HOSTS:
        raise DirectLinkError("the ticket names no usable address")
    try:
        hosts = [str(ipaddress.ip_address(host)) for host in hosts if isinstance(host, str) and len(host) <= 64]
    except ValueError as exc:
        raise DirectLinkError("the ticket names an address that is not an IP address") from exc
    if not hosts or not isinstance(port, int) or not 0 < port < 65536:
        raise DirectLinkError("the ticket names no usable address")
    if not isinstance(ticket_id, bytes) or len(ticket_id) != ID_BYTES:
        raise DirectLinkError("the ticket's id is malformed")
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        raise DirectLinkError("the ticket's secret is malformed")
    idle_s = reply.get("idle_s", 0.0)
    idle_s = float(idle_s) if isinstance(idle_s, (int, float)) and 0 <= idle_s < 1e6 else 0.0
    return Ticket(hosts, port, ticket_id, secret, idle_s)


async def ask_ticket(p2p: P2P, peer: PeerID, stream: str = INFERENCE) -> Ticket:
    request = runtime_pb2.ExpertUID(uid=stream)
    response = await p2p.call_protobuf_handler(peer, TICKET_RPC, request, runtime_pb2.ExpertInfo)
    return read_ticket(response.serialized_info, stream)


async def connect(ticket: Ticket) -> tuple[asyncio.StreamReader, SealedWriter]:
    """The link, through the first of the ticket's addresses that answers (tried all at once); the
    caller bounds the time."""
    loop = asyncio.get_running_loop()

    async def attempt(host: str) -> tuple[asyncio.Transport, SealedProtocol]:
        return await loop.create_connection(
            lambda: SealedProtocol(client_hello=(ticket.ticket_id, ticket.secret)), host=host, port=ticket.port
        )

    attempts = [asyncio.ensure_future(attempt(host)) for host in ticket.hosts]
    transport = protocol = None
    errors = []
    try:
        for next_done in asyncio.as_completed(attempts):
            try:
                transport, protocol = await next_done
                break
            except OSError as exc:
                errors.append(exc)
    finally:
        for pending in attempts:
            if pending.done() and not pending.cancelled() and pending.exception() is None:
                other, _ = pending.result()
                if other is not transport:
                    other.abort()  # another address answered first: the ticket is spent on that one
            else:
                pending.cancel()
    if protocol is None:
        raise DirectLinkError(f"no address of the ticket answered ({errors[0] if errors else 'none'})")
    try:
        protocol.send_hello()
        await protocol.ready
    except BaseException:
        transport.abort()
        raise
    return protocol.reader, protocol.writer


async def open_stream(
    p2p: P2P, peer: PeerID, stream: str = INFERENCE
) -> tuple[asyncio.StreamReader, SealedWriter, float]:
    """A direct link to `peer` (a Corolla server), carrying one `stream`, and how long the server keeps
    it waiting for a first message (0: unknown); the caller bounds the time."""
    ticket = await ask_ticket(p2p, peer, stream)
    reader, writer = await connect(ticket)
    return reader, writer, ticket.idle_s


class FailedPeers:
    """Servers a direct link failed to (no route, a firewall, an older Corolla server): they get p2pd
    for `RETRY_AFTER_S` instead of a wasted try per session."""

    def __init__(self) -> None:
        self._until: OrderedDict[PeerID, float] = OrderedDict()

    def __contains__(self, peer: PeerID) -> bool:
        until = self._until.get(peer)
        return until is not None and until >= time.monotonic()

    def add(self, peer: PeerID, exc: BaseException) -> None:
        logger.info("no direct link to …%s (%s); it goes through p2pd", str(peer)[-6:], exc or type(exc).__name__)
        self._until.pop(peer, None)
        self._until[peer] = time.monotonic() + RETRY_AFTER_S
        while len(self._until) > MAX_REMEMBERED:
            self._until.popitem(last=False)

    def recent(self) -> list[PeerID]:
        return [peer for peer in self._until if peer in self]


class DirectLinks:
    """A client's direct links: which servers it may try them with (`FailedPeers`), and one spare link
    per server it linked to, opened in the background, so that the next session there starts without
    the ticket's and the connection's round trips (three on a long link, against p2pd's one for a new
    stream)."""

    def __init__(self) -> None:
        self._failed = FailedPeers()
        self.opened: OrderedDict[PeerID, None] = OrderedDict()  # servers a link was made to (latest last)
        self._spares: dict[PeerID, tuple[asyncio.StreamReader, SealedWriter, float]] = {}
        self._preparing: dict[PeerID, asyncio.Task] = {}

    async def open(self, p2p: P2P, peer: PeerID) -> tuple[asyncio.StreamReader, SealedWriter]:
        """A link to `peer`: its spare if it has a usable one, else a new one; a spare for next time is
        prepared in the background either way."""
        spare = self._spares.pop(peer, None)
        if spare is not None and not spare[1].is_closing() and spare[2] > time.monotonic():
            reader, writer, _ = spare
        else:
            if spare is not None:
                spare[1].close()
            reader, writer, _ = await open_stream(p2p, peer)
        self._succeeded(peer)
        self._prepare_spare(p2p, peer)
        return reader, writer

    def _prepare_spare(self, p2p: P2P, peer: PeerID) -> None:
        if peer in self._preparing or len(self._spares) >= MAX_SPARES:
            return

        async def prepare() -> None:
            try:
                reader, writer, idle_s = await asyncio.wait_for(open_stream(p2p, peer), SPARE_OPEN_TIMEOUT_S)
            except Exception:
                return  # the next session opens its own link (or learns that it cannot)
            finally:
                self._preparing.pop(peer, None)
            old = self._spares.pop(peer, None)
            if old is not None:
                old[1].close()
            # used well before the server would close it for idling (a step sent into a closing link
            # would count as the server's failure)
            if idle_s > 0:
                self._spares[peer] = (reader, writer, time.monotonic() + min(SPARE_TTL_S, idle_s / 2))
            else:
                writer.close()

        self._preparing[peer] = asyncio.get_running_loop().create_task(prepare())

    async def close(self) -> None:
        """Close the spares (run on the client's loop, where they live): the servers free their slots at once."""
        for task in self._preparing.values():
            task.cancel()
        self._preparing.clear()
        for _, writer, _ in self._spares.values():
            writer.close()
        self._spares.clear()

    def worth_trying(self, p2p: object, peer: PeerID) -> bool:
        is_local = getattr(p2p, "is_local", None)
        if is_local is not None and is_local(peer):
            return False  # the own server of a node's client: called in-process already (local_calls.py)
        return peer not in self._failed

    def _succeeded(self, peer: PeerID) -> None:
        self.opened.pop(peer, None)
        self.opened[peer] = None
        while len(self.opened) > MAX_REMEMBERED:
            self.opened.popitem(last=False)

    def failed_recently(self) -> list[PeerID]:
        return self._failed.recent()

    def failed(self, peer: PeerID, exc: BaseException) -> None:
        self._failed.add(peer, exc)
