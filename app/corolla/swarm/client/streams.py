"""One rpc_inference stream to one server, as the client drives it, and the replay that fills a new
server's cache: what sessions (session.py), their failover (failover.py) and spot checks
(verification.py) all send and read through.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PHandlerError
from hivemind.proto import runtime_pb2

from corolla.swarm import protocol, steptrace, wire
from corolla.swarm.client.copies import CopyTiming
from corolla.swarm.client.growing_buffer import append_positions
from corolla.swarm.client.routing import RouteSegment, SwarmView
from corolla.swarm.step_metadata import NextServer, StepMetadata

ARGS_STRUCTURE = ((b"__T0", b"__T1", b"__T2"), {})
# Corolla servers read the padding mask as a keyword (stock servers never get one: see _check_padding).
MASKED_ARGS_STRUCTURE = ((b"__T0", b"__T1", b"__T2"), {"attention_mask": b"__T3"})
_DUMMY = serialize_torch_tensor(torch.zeros(0))
_DUMMY_IDS = serialize_torch_tensor(torch.zeros(0, dtype=torch.int64))
CLOSE_TIMEOUT = 5.0
DIRECT_OPEN_TIMEOUT = 2.0  # a direct link not made by then is not worth it: p2pd instead
REPLY_OVERHEAD_BYTES = 1024 * 1024  # a reply's metadata and framing beyond its hidden states
CLOSING_REPLY_MAX_BYTES = 16 * 1024 * 1024  # replies still read while closing are dropped: no more than this
_HANDLE = f"{protocol.HANDLER_CLASS_NAME}.rpc_inference"  # what hivemind's stub names the RPC


class ServerFailure(RuntimeError):
    pass


@dataclass
class StepExtras:
    """What a step sends besides hidden states: this span's deep prompts (first step only), the beams'
    reordering of the servers' caches, the padding mask over every position so far."""

    prompts: torch.Tensor | None = None  # [span blocks, batch or 1, P, hidden]
    hypo_ids: torch.Tensor | None = None  # int64 [batch]
    mask: torch.Tensor | None = None  # int64 [batch, position + length]
    next_servers: list[NextServer] | None = None  # where this server pushes its output (push.py)
    upstream: str | None = None  # the server that pushes into this one (push.py)


@dataclass
class ServerStream:
    """One rpc_inference stream to one server for blocks [start, end)."""

    segment: RouteSegment
    dht_prefix: str
    max_length: int
    adapter: str | None = None
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    # The stream itself: each message is written to p2pd as it is sent (no queue, no writer task) and
    # each reply read straight from the socket; hivemind's framing, so stock servers see no difference.
    _reader: asyncio.StreamReader | None = None
    _writer: asyncio.StreamWriter | None = None
    _stepped: bool = False
    _unread_replies: int = 0  # replies to register() still to be read before the next step's
    corolla: bool = False  # a Corolla server (announces corolla_version): reads next_servers in any step
    direct: bool = False  # the stream runs over a direct link (direct_link.py), not through p2pd
    slow: dict | None = None  # evidence that its server is consistently slow (speed.py): replaced at the next step
    kept_slow: bool = False  # ... unless nobody else serves its blocks
    copies: CopyTiming = field(default_factory=CopyTiming)  # when its pushed steps need the client's copy
    upstream_named: str | None = None  # the upstream server the client last named to it (push.py)
    reply_was_pushed: bool = False  # the last reply said its step came from a push (copies.py)
    # Every input this span has received, [batch, positions, hidden]: the first `_kept` positions of a
    # buffer that grows by doubling, so a token step appends in place instead of copying the whole
    # history (a torch.cat per token made a long session's steps O(length)).
    _buffer: torch.Tensor | None = None
    _kept: int = 0

    @property
    def history(self) -> torch.Tensor | None:
        """The inputs so far (a view: never written to later, appends go past it or to a new buffer)."""
        return None if self._buffer is None else self._buffer[:, : self._kept]

    @history.setter
    def history(self, value: torch.Tensor | None) -> None:
        self._buffer, self._kept = value, 0 if value is None else value.shape[1]

    def remember(self, inputs: torch.Tensor) -> None:
        """Append a step's inputs to the history."""
        if self._buffer is None:
            self.history = inputs
            return
        self._buffer = append_positions(self._buffer, self._kept, inputs)
        self._kept += inputs.shape[1]

    @property
    def position(self) -> int:
        return self._kept

    async def open(self, view: SwarmView, timeout: float) -> None:
        view.stub(self.segment.peer_id)  # refuses a peer outside the privacy policy
        peer = PeerID.from_base58(self.segment.peer_id)
        if self.corolla and view.config.direct_links and view.direct_links.worth_trying(view.p2p, peer):
            # A Corolla server this client can reach: a TCP connection of its own, not through p2pd
            # (direct_link.py); where it cannot be made, p2pd as for any other server.
            try:
                opening = view.direct_links.open(view.p2p, peer)
                self._reader, self._writer = await asyncio.wait_for(opening, min(timeout, DIRECT_OPEN_TIMEOUT))
                self.direct = True
                return
            except Exception as exc:
                view.direct_links.failed(peer, exc)
        opening = view.p2p.call_binary_stream_handler(peer, _HANDLE)
        _, self._reader, self._writer = await asyncio.wait_for(opening, timeout)

    def _write(self, request: runtime_pb2.ExpertRequest) -> None:
        self._writer.write(wire.frame(request))

    def register(self, batch: int, hidden_size: int) -> None:
        """Open the session at the server with an empty step (max_length, no tokens) without waiting for
        its reply, so the route's first real step can already be pushed into it (a server takes pushes
        only into sessions it knows). Corolla servers only: what a stock server makes of an empty first
        step is not part of the protocol."""
        if self._writer is None or self._stepped:
            return
        empty = torch.zeros(batch, 0, hidden_size)
        metadata = StepMetadata(
            session_id=self.session_id,
            step_id=str(uuid.uuid4()),
            args_structure=ARGS_STRUCTURE,
            start_from_position=0,
            max_length=self.max_length,
            active_adapter=self.adapter,
        )
        uid = protocol.chain_uids(self.dht_prefix, self.segment.start, self.segment.end)
        tensors = [serialize_torch_tensor(empty), _DUMMY, _DUMMY_IDS]
        self._write(runtime_pb2.ExpertRequest(uid=uid, tensors=tensors, metadata=metadata.pack()))
        self._stepped = True
        self._unread_replies += 1

    async def step(
        self,
        inputs: torch.Tensor,
        step_id: str,
        position: int,
        timeout: float | None,
        extras: StepExtras | None = None,
    ) -> torch.Tensor:
        """Send one step and wait (at most `timeout`) for its reply."""
        self.send(inputs, step_id, position, extras)
        return await self.read(inputs, step_id, timeout)

    def send(self, inputs: torch.Tensor, step_id: str, position: int, extras: StepExtras | None = None) -> None:
        if self._writer is None:
            raise ServerFailure(f"the session with server …{self.segment.peer_id[-6:]} is closed")
        uid = protocol.chain_uids(self.dht_prefix, self.segment.start, self.segment.end)
        extras = extras or StepExtras()
        first = not self._stepped
        # next_servers not in a stock server's first step: Petals 2.1-2.3.0.dev1 would keep pushing
        # every later step to the chain named there, stale after a failover.
        pushes_to = extras.next_servers if extras.next_servers and (self._stepped or self.corolla) else None
        metadata = StepMetadata(
            session_id=self.session_id,
            step_id=step_id,
            args_structure=ARGS_STRUCTURE if extras.mask is None else MASKED_ARGS_STRUCTURE,
            start_from_position=position,
            max_length=self.max_length if first else None,
            active_adapter=self.adapter if first else None,
            next_servers=None if pushes_to is None else tuple(pushes_to),
            upstream=extras.upstream or None,
        )
        tensors = [
            wire.serialize_plain(inputs),
            _DUMMY if extras.prompts is None else serialize_torch_tensor(extras.prompts),
            _DUMMY_IDS if extras.hypo_ids is None else serialize_torch_tensor(extras.hypo_ids),
        ]
        if extras.mask is not None:
            tensors.append(serialize_torch_tensor(extras.mask))
        request = runtime_pb2.ExpertRequest(uid=uid, tensors=tensors, metadata=metadata.pack())
        steptrace.mark("client_send", step=step_id, server=self.segment.peer_id[-6:])  # the write is the leg's
        self._write(request)
        self._stepped = True
        self.upstream_named = extras.upstream

    async def read(self, inputs: torch.Tensor, step_id: str, timeout: float | None) -> torch.Tensor:
        """The server's reply to the step just sent (`timeout` None: the caller bounds the wait)."""
        if self._reader is None:
            raise ServerFailure(f"the session with server …{self.segment.peer_id[-6:]} is closed")
        # The reply holds the step's hidden states: as many as the inputs, at most 8 bytes each, and room for
        # the metadata; a server that announces more is not read (hostile, or broken).
        max_bytes = inputs.numel() * 8 + REPLY_OVERHEAD_BYTES
        if timeout is None:  # the caller's own timeout bounds this wait (_race): no second timer per token
            response = await self._reply(max_bytes)
        else:
            async with asyncio.timeout(timeout):  # cheaper than wait_for: no extra task per token
                response = await self._reply(max_bytes)
        steptrace.mark("client_reply", step=step_id, server=self.segment.peer_id[-6:])
        self.reply_was_pushed = response.metadata == protocol.PUSHED_REPLY_METADATA
        output = wire.deserialize_plain(response.tensors[0])
        if output.shape != inputs.shape:
            raise ServerFailure(f"server returned shape {tuple(output.shape)} for inputs {tuple(inputs.shape)}")
        return output

    async def _reply(self, max_bytes: int) -> runtime_pb2.ExpertResponse:
        await self._writer.drain()  # a long replay: wait until p2pd took it (a token step never waits)
        while self._unread_replies:  # register()'s reply came long ago; it carries nothing
            await self._next_reply(REPLY_OVERHEAD_BYTES)
            self._unread_replies -= 1
        return await self._next_reply(max_bytes)

    async def _next_reply(self, max_bytes: int) -> runtime_pb2.ExpertResponse:
        try:
            response, error = await wire.receive_protobuf(runtime_pb2.ExpertResponse, self._reader, max_bytes)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise ServerFailure(f"server …{self.segment.peer_id[-6:]} closed the session") from exc
        except wire.OversizeMessage as exc:
            raise ServerFailure(f"server …{self.segment.peer_id[-6:]} sent {exc}") from exc
        if error is not None:  # hivemind's wording: server_refusal() reads the server's text from it
            raise P2PHandlerError(f"Failed to call handler `{_HANDLE}` at {self.segment.peer_id}: {error.message}")
        return response

    async def close(self) -> None:
        if self._writer is None:
            return
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        try:
            # A server that never closes its side must not hold the client (or a node's thread) forever.
            async with asyncio.timeout(CLOSE_TIMEOUT):
                if self._stepped:
                    writer.write(wire.frame(runtime_pb2.ExpertRequest()))  # the empty request closes the session
                writer.write(wire.frame(P2P.END_OF_STREAM))
                await writer.drain()
                while True:  # the server's last replies, until it ends the stream
                    await wire.receive_protobuf(runtime_pb2.ExpertResponse, reader, CLOSING_REPLY_MAX_BYTES)
        except Exception:
            pass  # the stream's end (IncompleteReadError), or a stream that breaks or stalls: all the same here
        finally:
            with contextlib.suppress(Exception):  # a close still pending when its loop ended: nothing to close
                writer.close()


def server_refusal(exc: BaseException) -> str | None:
    """The server's own error text from hivemind's "Failed to call handler `X` at PEER: TEXT"; None for
    failures that are not a server's answer (timeouts, closed streams)."""
    if not isinstance(exc, P2PHandlerError):
        return None
    text = str(exc)
    marker = text.find(": ", text.find(" at ") + 1) if " at " in text else -1
    return (text[marker + 2 :] if marker >= 0 else text).strip()[:500] or None


async def replay(
    streams: list[ServerStream],
    history: torch.Tensor,
    *,
    extras_for: Callable[[ServerStream], StepExtras],
    timeout_for: Callable[[ServerStream, torch.Tensor], float | None],
    on_output: Callable[[ServerStream, torch.Tensor, torch.Tensor, float], None] | None = None,
    on_timeout: Callable[[ServerStream, float], None] | None = None,
) -> torch.Tensor:
    """Send `history` [batch, positions, hidden] through `streams` (new sessions of consecutive spans)
    as each one's first step: each gets the previous one's full output and keeps it as its history.
    Returns the last one's output. `on_output(stream, inputs, output, seconds)` sees each answer,
    `on_timeout(stream, seconds)` each server that missed its deadline (the TimeoutError propagates)."""
    loop = asyncio.get_running_loop()
    full = history
    for stream in streams:
        started = loop.time()
        try:
            output = await stream.step(full, str(uuid.uuid4()), 0, timeout_for(stream, full), extras_for(stream))
        except TimeoutError:
            if on_timeout is not None:
                on_timeout(stream, loop.time() - started)
            raise
        stream.history = full
        if on_output is not None:
            on_output(stream, full, output, loop.time() - started)
        full = output
    return full
