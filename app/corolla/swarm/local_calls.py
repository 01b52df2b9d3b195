"""Calls from a swarm client to the block server of the same process and peer id, without p2pd.

While the node contributes, the chat engine's swarm client lives in the block server's process and uses
the server's DHT and p2pd (one daemon per computer, issue 29). Its route then names its own peer id (in
the embedded swarm the own server is the only one), and libp2p cannot dial itself. So a call to that
peer id is handed to the server's registered handlers here, in-process:

- a stream (rpc_inference, rpc_forward_stream, ...) is a `socket.socketpair()`: the server's end is given
  to the very handler p2pd would call (found in the server's P2P client's table, so a handler the server
  removed on pause is gone here too), the client's end is returned as p2pd's stream_open would. Both ends
  are real asyncio streams with kernel buffering: the framing, the handler code path, admission, per-peer
  stream counts, message limits and timeouts are the ones remote callers meet;
- a unary call (rpc_info, rpc_forward, rpc_backward, rpc_push) runs the server's registered unary handler
  on the request's serialized bytes, with p2pd's size limit and error wording (P2PHandlerError(repr(exc))).

Event loops: the server's handlers and its P2P object live on the server's loop (its main thread); the
client's P2P replica lives on the client's own loop (ClientLoop's thread). Each side keeps its loop: the
server's end of a stream is opened and served on the server's loop (run_coroutine_threadsafe), the
client's end on the client's; the bytes cross between threads through the kernel. Nothing of one loop
is awaited on the other, so neither blocks the other, and a stopped server loop only fails the client's
calls (which every caller bounds with its own timeout).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import weakref
from typing import Any

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure, P2PDaemonError, P2PHandlerError
from hivemind.utils.multiaddr import Multiaddr

Writer = asyncio.StreamWriter
IN_PROCESS_ADDR = Multiaddr("/unix/in-process")  # what a local stream's StreamInfo gives as the caller's address


class LocalServer:
    """The block server's side: its P2P object (on whose client its handlers are registered) and the
    event loop that P2P lives on. Made on that loop (the server's start-up)."""

    def __init__(self, p2p: P2P):
        self.p2p = p2p
        self.peer_id: PeerID = p2p.peer_id
        self.loop = asyncio.get_running_loop()
        self._streams: set[asyncio.Task] = set()  # the handlers serving local streams (kept from the collector)

    def _control(self) -> Any:
        """hivemind's ControlClient of the server's P2P: the tables of handlers p2pd dispatches to (the
        server's registrations and removals land there)."""
        return self.p2p._client.control

    def _on_server_loop(self, coroutine) -> concurrent.futures.Future:
        if self.loop.is_closed():
            coroutine.close()
            raise P2PDaemonError("the block server of this process has stopped")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    async def open_stream(self, caller: PeerID, name: str) -> tuple[StreamInfo, asyncio.StreamReader, Writer]:
        """As p2pd's stream_open to this server: the stream's info and the caller's reader and writer.
        Awaited on the caller's loop."""
        server_end, client_end = socket.socketpair()
        info = StreamInfo(caller, IN_PROCESS_ADDR, name)
        try:
            serving = self._on_server_loop(self._serve_stream(info, server_end))
        except BaseException:
            server_end.close()
            client_end.close()
            raise
        try:  # from here the server's end is the server loop's (closed there, or ended by our close)
            await asyncio.wrap_future(serving)
            reader, writer = await asyncio.open_connection(sock=client_end)
        except BaseException:
            client_end.close()
            raise
        return StreamInfo(self.peer_id, IN_PROCESS_ADDR, name), reader, writer

    async def _serve_stream(self, info: StreamInfo, sock: socket.socket) -> None:
        try:
            handler = self._control().handlers.get(info.proto)  # what p2pd would dispatch to
            if handler is None:
                raise ControlFailure(f"Connect failed. msg=protocols not supported: [{info.proto}]")
            reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        task = asyncio.create_task(handler(info, reader, writer))
        self._streams.add(task)
        task.add_done_callback(self._streams.discard)

    async def call_unary(self, caller: PeerID, name: str, request: bytes) -> bytes:
        """As p2pd's unary call to this server, awaited on the caller's loop."""
        limit = self._control().persistent_conn_max_msg_size
        if len(request) > limit:
            raise P2PDaemonError(f"Message size exceeds set limit {limit}")
        return await asyncio.wrap_future(self._on_server_loop(self._run_unary(caller, name, request, limit)))

    async def _run_unary(self, caller: PeerID, name: str, request: bytes, limit: int) -> bytes:
        handler = self._control().unary_handlers.get(name)
        if handler is None:
            raise P2PDaemonError(f"protocols not supported: [{name}]")
        try:
            response = await handler(request, caller)
        except Exception as exc:  # as p2pclient reports a handler's failure to a remote caller
            raise P2PHandlerError(repr(exc)) from None
        if len(response) > limit:
            raise P2PHandlerError("response size exceeds message size limit")
        return response


class SharedP2P:
    """A client's P2P on a p2pd it shares (a replica, on the client's loop): reaches `local`'s peer id
    in-process (if given) and every other peer through p2pd; everything else is the replica's.

    Its shutdown() closes every stream it opened before the replica: p2pd stays, so nothing else would end
    them, and the servers would keep those sessions' caches until their timeouts (a client with its own
    p2pd had them all cut when its p2pd went)."""

    # hivemind's own stub plumbing, run against this object so that it calls the two methods below.
    call_protobuf_handler = P2P.call_protobuf_handler
    iterate_protobuf_handler = P2P.iterate_protobuf_handler
    _iterate_protobuf_stream_handler = P2P._iterate_protobuf_stream_handler

    def __init__(self, p2p: P2P, local: LocalServer | None = None):
        self.replica, self.local = p2p, local
        self._writers: weakref.WeakSet[asyncio.StreamWriter] = weakref.WeakSet()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.replica, name)

    def _is_local(self, peer_id: PeerID) -> bool:
        return self.local is not None and peer_id == self.local.peer_id

    is_local = _is_local  # direct_link.py: the own server needs no direct link

    async def call_binary_stream_handler(
        self, peer_id: PeerID, handler_name: str
    ) -> tuple[StreamInfo, asyncio.StreamReader, asyncio.StreamWriter]:
        if self._is_local(peer_id):
            opened = await self.local.open_stream(self.replica.peer_id, handler_name)
        else:
            opened = await self.replica.call_binary_stream_handler(peer_id, handler_name)
        self._writers.add(opened[2])
        return opened

    async def _call_unary_protobuf_handler(self, peer_id: PeerID, name: str, input: Any, output_type: type) -> Any:
        if self._is_local(peer_id):
            response = await self.local.call_unary(self.replica.peer_id, name, input.SerializeToString())
            return output_type.FromString(response)
        return await self.replica._call_unary_protobuf_handler(peer_id, name, input, output_type)

    async def shutdown(self) -> None:
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.close()
        await self.replica.shutdown()
