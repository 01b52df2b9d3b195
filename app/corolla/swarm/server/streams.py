"""Streaming RPC registration whose error replies reach the caller.

hivemind's own stream handler sends the error reply and closes its end at once. p2pd then closes
the libp2p stream in both directions and, when its reading side reports the closed stream as an
error, resets it; a reset that overtakes the error reply discards it, and the caller sees a bare
"connection lost" instead of why its request was refused. After an error this handler keeps its end
open until the caller, having read the reply, closes the stream (bounded by `linger_s`); after a normal
end it waits the same way for the caller's end-of-stream marker, whose write would otherwise meet a
closed pipe. The framing
is hivemind's (P2P.send_protobuf / receive_protobuf), so stock Petals peers see no difference.

Unlike hivemind's reader, this one never trusts a peer's length prefix: a message longer than
`max_message_bytes` ends the stream before its body is read, every body read is bounded in time,
bytes read but not yet taken by the handler count against a budget shared by all streams, and each
peer may hold only so many streams open at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import mmap
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError
from hivemind.p2p import P2P, P2PContext
from hivemind.proto.p2pd_pb2 import RPCError

from corolla.swarm.server.refusals import RefusalBudget, RefusalLog

logger = logging.getLogger(__name__)

StreamHandler = Callable[[AsyncIterator, P2PContext], AsyncIterator]
MAX_PREFETCH = 5  # requests read ahead of the handler, as hivemind does
LINGER_S = 2.0
MIN_BODY_RATE = 1024 * 1024  # bytes/s a sender must at least keep up once it announced a message
BODY_GRACE_S = 10.0
BUDGET_WAIT_S = 10.0
LARGE_BODY_BYTES = 256 * 1024
SMALL_BODY_BYTES = 64 * 1024  # within the reader's own buffer limit: read whole, no pieces (token steps)
HELD_STREAM_MAX_BYTES = 1024 * 1024  # what the caller of a held stream may send while it waits (read, dropped)
TURNED_AWAY = "too many of this peer's requests were refused; try again in a few seconds"


class StreamRefused(Exception):
    """A stream this server ends early: an oversized or too slow message, too many streams."""


@dataclass
class StreamLimits:
    max_message_bytes: int
    buffered_bytes: int  # read-but-unprocessed request bytes of all streams together
    streams_per_peer: int
    refusals: RefusalBudget | None = None  # a peer out of refusals has its streams closed unread
    refusal_log: RefusalLog | None = None
    _buffered: int = 0
    _freed: asyncio.Condition | None = None
    _waiting: int = 0  # reserve() calls waiting for room
    _open: Counter = field(default_factory=Counter)

    async def reserve(self, nbytes: int) -> None:
        if not self._waiting and self._buffered + nbytes <= self.buffered_bytes:
            self._buffered += nbytes  # room and nobody ahead: no lock, no timer (every message comes here)
            return
        if self._freed is None:
            self._freed = asyncio.Condition()
        self._waiting += 1
        try:
            async with self._freed:
                try:
                    await asyncio.wait_for(
                        self._freed.wait_for(lambda: self._buffered + nbytes <= self.buffered_bytes), BUDGET_WAIT_S
                    )
                except TimeoutError as exc:
                    raise StreamRefused("this server is busy receiving other requests; try again") from exc
                self._buffered += nbytes
        finally:
            self._waiting -= 1

    def release(self, nbytes: int) -> None:
        self._buffered -= nbytes
        if self._waiting and self._freed is not None and nbytes:  # wake only those who wait for room
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._freed:
            self._freed.notify_all()

    @property
    def buffered(self) -> int:
        return self._buffered


def default_limits() -> StreamLimits:
    return StreamLimits(max_message_bytes=64 * 1024 * 1024, buffered_bytes=256 * 1024 * 1024, streams_per_peer=64)


async def receive_message(request_type: type, reader: asyncio.StreamReader, limits: StreamLimits) -> tuple:
    """hivemind's receive_protobuf with the length prefix checked before the body is read.

    Returns (request, nbytes reserved in `limits`); request None is the caller's end-of-stream marker."""
    header = await reader.readexactly(1 + P2P.HEADER_LEN)
    marker, length = header[:1], int.from_bytes(header[1:], P2P.BYTEORDER)
    if marker not in (P2P.MESSAGE_MARKER, P2P.ERROR_MARKER):
        raise StreamRefused(f"unknown message marker {marker!r}")
    if length > limits.max_message_bytes:
        raise StreamRefused(f"a message of {length} bytes is over this server's limit of {limits.max_message_bytes}")
    reserved = 2 * length  # the body, then the parsed message
    await limits.reserve(reserved)
    try:
        if length <= SMALL_BODY_BYTES and _buffered(reader) >= length:
            body = await reader.readexactly(length)  # all there (a token step, as a rule): no wait, no timer
        else:
            async with asyncio.timeout(BODY_GRACE_S + length / MIN_BODY_RATE):
                # A small body in one read; larger ones in pieces (_read_body says why).
                body = (
                    await reader.readexactly(length) if length <= SMALL_BODY_BYTES else await _read_body(reader, length)
                )
        if marker == P2P.ERROR_MARKER:  # hivemind's end-of-stream marker is an (empty) error message
            if isinstance(body, _Body):
                body.release()
            limits.release(reserved)
            return None, 0
        request = request_type()
        if isinstance(body, _Body):
            try:
                request.ParseFromString(body.view)
            finally:
                body.release()
        else:
            request.ParseFromString(body)
        return request, reserved
    except BaseException:
        limits.release(reserved)
        raise


def _buffered(reader: asyncio.StreamReader) -> int:
    """Bytes `reader` holds unread. asyncio has no public call for it; a reader without its `_buffer`
    counts as holding none, so its reads take the timed path. Why it is worth asking: arming and
    cancelling a timer for every message was about 1.4% of a middle server's time per token step."""
    return len(getattr(reader, "_buffer", b""))


class _Body:
    """A message body of known length. Large ones live in their own anonymous memory map, given back
    to the system the moment they are released: on the heap, a few interleaved multi-MiB buffers
    fragment it so badly that the process keeps growing long after the messages are gone."""

    def __init__(self, length: int):
        self._map = mmap.mmap(-1, length) if length >= LARGE_BODY_BYTES else None
        self.view = memoryview(self._map if self._map is not None else bytearray(length))

    def release(self) -> None:
        self.view.release()
        if self._map is not None:
            self._map.close()


async def _read_body(reader: asyncio.StreamReader, length: int) -> _Body:
    """`length` bytes, read in small pieces: StreamReader.readexactly would grow its own buffer to the
    whole message and then copy it twice."""
    body = _Body(length)
    received = 0
    try:
        while received < length:
            chunk = await reader.read(min(length - received, 64 * 1024))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", length)
            body.view[received : received + len(chunk)] = chunk
            received += len(chunk)
    except BaseException:
        body.release()
        raise
    return body


async def _drain_held(reader: asyncio.StreamReader, seconds: float) -> None:
    """While a turned-away stream is held, read and drop what its caller sends, so that nothing piles up
    for it in p2pd or in the kernel; end the hold early when the caller hangs up (its socket is freed at
    once) or sends more than `HELD_STREAM_MAX_BYTES` (it is not waiting for an answer, it is pushing)."""

    async def drain() -> None:
        received = 0
        while received <= HELD_STREAM_MAX_BYTES:
            chunk = await reader.read(64 * 1024)
            if not chunk:
                return
            received += len(chunk)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(drain(), seconds)


class StreamRequests:
    """The requests of one stream as its handler takes them: an async iterator over what the stream's
    reader queued, or, once the handler calls `deliver_to`, each handed by the reader straight to the
    handler's callback. That saves a task hand-off per message (a loop iteration and a task wake-up, on
    every token step of every server), where a handler has an inbox of its own (inference sessions)."""

    def __init__(self, queue: asyncio.Queue, limits: StreamLimits):
        self._queue, self._limits = queue, limits
        self._ended = False
        self.sink: Callable[[object], Awaitable[None]] | None = None

    def __aiter__(self) -> StreamRequests:
        return self

    async def __anext__(self) -> object:
        if self._ended or self.sink is not None:
            raise StopAsyncIteration
        request, nbytes = await self._queue.get()
        self._limits.release(nbytes)
        if request is None:  # the caller's end of stream
            self._ended = True
            raise StopAsyncIteration
        return request

    async def put(self, request: object, nbytes: int) -> None:
        """The stream reader's hand-over of one message (None: the caller's end of stream), `nbytes` of it
        reserved in the budget: released once the message is the handler's (its sink's, or taken from
        the queue)."""
        if self.sink is not None:
            self._limits.release(nbytes)
            await self.sink(request)
            return
        try:
            await self._queue.put((request, nbytes))
        except BaseException:
            self._limits.release(nbytes)
            raise

    def deliver_to(self, sink: Callable[[object], Awaitable[None]]) -> bool:
        """From now on the stream's reader awaits `sink(request)` for each message, and `sink(None)` for
        the caller's end of stream, instead of queueing them (the sink's own queue bounds what is read
        ahead). False, and nothing changes, while queued messages wait (they come first: read them, then
        try again) or after the end of the stream."""
        if self._ended or not self._queue.empty():
            return False
        self.sink = sink
        return True


async def add_stream_handler(
    p2p: P2P,
    name: str,
    handler: StreamHandler,
    request_type: type,
    linger_s: float = LINGER_S,
    limits: StreamLimits | None = None,
) -> Callable[..., Awaitable[None]]:
    """Serve `name` (stream in, stream out) with `handler`; close only once the caller is done.
    Handlers that share one `limits` share its budget and its per-peer stream count."""
    limits = limits if limits is not None else default_limits()

    async def handle(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = stream_info.peer_id
        if limits.refusals is not None and not limits.refusals.admits(peer):
            # Turned away unread: held a while (refusals.py says why), then no reply to wait for, no
            # linger (the cheapest way to say no).
            with contextlib.suppress(ConnectionError, OSError), contextlib.closing(writer):
                await limits.refusals.hold(peer, wait=functools.partial(_drain_held, reader))
                await P2P.send_protobuf(RPCError(message=TURNED_AWAY), writer)
            return
        limits._open[peer] += 1
        try:
            if limits._open[peer] > limits.streams_per_peer:
                if limits.refusals is not None:
                    limits.refusals.charge(peer)
                with contextlib.suppress(ConnectionError, OSError), contextlib.closing(writer):
                    message = f"too many open streams from one peer (at most {limits.streams_per_peer})"
                    await P2P.send_protobuf(RPCError(message=message), writer)
                    await _wait_for_caller_to_finish(
                        reader, asyncio.ensure_future(receive_message(request_type, reader, limits)), limits, linger_s
                    )
                return
            await serve_stream(stream_info, reader, writer)
        finally:
            limits._open[peer] -= 1
            if not limits._open[peer]:
                del limits._open[peer]

    async def serve_stream(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=stream_info.peer_id)
        requests: asyncio.Queue = asyncio.Queue(MAX_PREFETCH)

        incoming = StreamRequests(requests, limits)

        async def process() -> None:
            try:
                async for response in handler(incoming, context):
                    try:
                        await P2P.send_protobuf(response, writer)
                    except (ConnectionError, OSError):
                        return  # the caller is gone; nothing left to tell it
            except Exception as exc:  # the handler refused the request: tell the caller why
                logger.debug("%s failed for %s: %s", name, stream_info.peer_id, exc)
                with contextlib.suppress(ConnectionError, OSError):
                    await P2P.send_protobuf(RPCError(message=str(exc)), writer)

        async def read_requests() -> bool:
            """Hand the caller's messages to the handler until its end-of-stream marker (True) or a close
            or refusal (False); once the handler is done, drop what still comes (bytes back to the budget)."""
            while True:
                try:
                    request, nbytes = await receive_message(request_type, reader, limits)
                except asyncio.IncompleteReadError:
                    return False  # the caller closed or died
                except (StreamRefused, DecodeError) as exc:
                    if processing.done():
                        return False  # lingering after the handler: nothing left to refuse
                    if isinstance(exc, DecodeError):
                        exc = StreamRefused(f"a message that does not parse: {exc}")
                    if limits.refusals is not None:
                        limits.refusals.charge(stream_info.peer_id)
                    if limits.refusal_log is not None:
                        limits.refusal_log.refused(f"{name.rsplit('.', 1)[-1]}: ended a stream: {exc}")
                    else:
                        logger.info("%s: ended a stream of %s: %s", name, stream_info.peer_id, exc)
                    with contextlib.suppress(ConnectionError, OSError):
                        await P2P.send_protobuf(RPCError(message=str(exc)), writer)
                    return False
                if processing.done():
                    limits.release(nbytes)
                else:
                    await incoming.put(request, nbytes)
                if request is None:  # the caller's end-of-stream marker: nothing more will come
                    return True

        with contextlib.closing(writer):
            processing = asyncio.create_task(process())
            # One reader for the whole stream (not a task and an asyncio.wait per message).
            reading = asyncio.create_task(read_requests())
            try:
                await asyncio.wait({processing, reading}, return_when=asyncio.FIRST_COMPLETED)
                if processing.done():
                    # Discard what the caller still sends until its end-of-stream marker or its close,
                    # for at most `linger_s`: closing first would break its pipe while it writes it.
                    while not requests.empty():  # a reader blocked on a full queue goes on, and drops
                        limits.release(requests.get_nowait()[1])
                    await asyncio.wait({reading}, timeout=linger_s)
                elif reading.exception() is None and reading.result():
                    await processing  # the caller's end of stream: the handler finishes its replies
            except Exception:
                logger.debug("%s: reading requests failed", name, exc_info=True)
            finally:
                for task in (reading, processing):
                    task.cancel()
                for task in (reading, processing):
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                while not requests.empty():  # what the handler never took goes back to the budget
                    limits.release(requests.get_nowait()[1])

    await p2p.add_binary_stream_handler(name, handle)
    return handle  # direct links (direct_link.py) hand their streams to it too


async def _wait_for_caller_to_finish(
    reader: asyncio.StreamReader, pending: asyncio.Future, limits: StreamLimits, linger_s: float
) -> None:
    """Discard what the caller still sends until its end-of-stream marker or its close, for at most
    `linger_s`: closing first would break the caller's pipe while it writes that marker."""

    async def drain() -> None:
        receiving = pending
        while True:
            try:
                request, nbytes = await receiving
            except (asyncio.IncompleteReadError, ConnectionError, OSError, StreamRefused):
                return
            limits.release(nbytes)
            if request is None:
                return
            receiving = asyncio.ensure_future(receive_message(type(request), reader, limits))

    try:
        await asyncio.wait_for(drain(), timeout=linger_s)
    except Exception:  # a timeout, or a caller that breaks the stream: either way, done
        pass
    finally:
        if not pending.done():
            pending.cancel()
