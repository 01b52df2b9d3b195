"""Streaming RPC registration whose error replies reach the caller.

hivemind's own stream handler sends the error reply and closes its end at once. p2pd then closes
the libp2p stream in both directions and, when its reading side reports the closed stream as an
error, resets it; a reset that overtakes the error reply discards it, and the caller sees a bare
"connection lost" instead of why its request was refused. After an error this handler keeps its end
open until the caller, having read the reply, closes the stream (bounded by `linger_s`); after a normal
end it waits the same way for the caller's end-of-stream marker, whose write would otherwise meet a
closed pipe. The framing
is hivemind's (P2P.send_protobuf / receive_protobuf), so stock Petals peers see no difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from hivemind.p2p import P2P, P2PContext
from hivemind.proto.p2pd_pb2 import RPCError

logger = logging.getLogger(__name__)

StreamHandler = Callable[[AsyncIterator, P2PContext], AsyncIterator]
MAX_PREFETCH = 5  # requests read ahead of the handler, as hivemind does
LINGER_S = 2.0


async def add_stream_handler(
    p2p: P2P, name: str, handler: StreamHandler, request_type: type, linger_s: float = LINGER_S
) -> None:
    """Serve `name` (stream in, stream out) with `handler`; close only once the caller is done."""

    async def handle(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=stream_info.peer_id)
        requests: asyncio.Queue = asyncio.Queue(MAX_PREFETCH)

        async def incoming() -> AsyncIterator:
            while (request := await requests.get()) is not None:  # None: the caller's end of stream
                yield request

        async def process() -> None:
            try:
                async for response in handler(incoming(), context):
                    try:
                        await P2P.send_protobuf(response, writer)
                    except (ConnectionError, OSError):
                        return  # the caller is gone; nothing left to tell it
            except Exception as exc:  # the handler refused the request: tell the caller why
                logger.debug("%s failed for %s: %s", name, stream_info.peer_id, exc)
                with contextlib.suppress(ConnectionError, OSError):
                    await P2P.send_protobuf(RPCError(message=str(exc)), writer)

        with contextlib.closing(writer):
            processing = asyncio.create_task(process())
            try:
                while True:
                    receiving = asyncio.create_task(P2P.receive_protobuf(request_type, reader))
                    await asyncio.wait({processing, receiving}, return_when=asyncio.FIRST_COMPLETED)
                    if processing.done():
                        await _wait_for_caller_to_finish(reader, receiving, request_type, linger_s)
                        return
                    try:
                        request, _ = receiving.result()
                    except asyncio.IncompleteReadError:
                        return  # the caller closed or died
                    await requests.put(request)
                    if request is None:  # the caller's end-of-stream marker: nothing more will come
                        await processing
                        return
            except Exception:
                logger.debug("%s: reading requests failed", name, exc_info=True)
            finally:
                processing.cancel()

    await p2p.add_binary_stream_handler(name, handle)


async def _wait_for_caller_to_finish(
    reader: asyncio.StreamReader, pending: asyncio.Task, request_type: type, linger_s: float
) -> None:
    """Discard what the caller still sends until its end-of-stream marker or its close, for at most
    `linger_s`: closing first would break the caller's pipe while it writes that marker."""

    async def drain() -> None:
        receiving = pending
        while True:
            try:
                request, _ = await receiving
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                return
            if request is None:
                return
            receiving = asyncio.ensure_future(P2P.receive_protobuf(request_type, reader))

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(drain(), timeout=linger_s)
