"""Inference sessions' work: what the handler's rpc_inference runs once a session is admitted."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

# hivemind tells streaming RPCs apart by `typing.AsyncIterator` annotations (not collections.abc's).
from typing import AsyncIterator  # noqa: UP035

import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from corolla.swarm import protocol, steptrace
from corolla.swarm.models.batched_step import StepRow, can_join
from corolla.swarm.models.cache import SessionCache
from corolla.swarm.models.errors import EngineError
from corolla.swarm.models.span import BlockSpan
from corolla.swarm.models.static_cache import StaticSessionCache
from corolla.swarm.server import block_args
from corolla.swarm.server.adapters import run_with_adapter
from corolla.swarm.server.compute_queue import Priority
from corolla.swarm.server.packing import (
    BadRequest,
    deserialize_tensors,
    is_dummy,
    read_step,
    serialize,
    unpack_args_kwargs,
)
from corolla.swarm.server.push import follow_named_upstream
from corolla.swarm.server.step_batcher import MAX_STEP_TOKENS
from corolla.swarm.step_metadata import StepMetadata


@dataclass
class OpenSession:
    """An open inference session: who opened it, which blocks, and where pushed steps go."""

    owner: PeerID
    chain: str
    # The session's inbox: pushed steps as (request, its StepMetadata), decoded once by rpc_push, and
    # the client's own messages (SessionInputs puts them there).
    pushes: asyncio.Queue
    pusher: PeerID | None = None
    reserving: bool = True


class _FromClient:
    """A message of the client's own stream in a session's inbox (pushes sit there as (request, metadata))."""

    __slots__ = ("metadata", "request")

    def __init__(self, request: runtime_pb2.ExpertRequest, metadata: StepMetadata):
        self.request, self.metadata = request, metadata


_CLIENT_DONE = object()


class SessionInputs:
    """The next message of an inference session, with its decoded metadata: from the client's stream
    or a server's push.

    Both arrive in one inbox (the session's push queue). The client's messages are handed there by the
    stream's own reader (streams.StreamRequests.deliver_to: a token step costs one task hand-off, from
    the reader to the session); where the stream cannot (messages already queued, another iterator), a
    task of this session moves them until it can."""

    def __init__(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], pushes: asyncio.Queue):
        self._requests, self._inbox = requests, pushes
        self._reader: asyncio.Task | None = None
        self._delivered = False  # the stream's reader puts the client's messages in the inbox itself
        self._stopped = False  # a refused message or close(): the client's later messages are dropped
        self.client_done = False
        self.last_was_pushed = False

    def _hand_over(self) -> bool:
        """Whether the stream's reader now delivers the client's messages to the inbox directly."""
        deliver_to = getattr(self._requests, "deliver_to", None)
        self._delivered = deliver_to is not None and deliver_to(self._deliver)
        return self._delivered

    async def _deliver(self, request: runtime_pb2.ExpertRequest | None) -> None:
        """One message of the client's stream (None: its end), from the stream's reader, into the inbox."""
        if self._stopped:
            return
        if request is None:
            await self._inbox.put(_CLIENT_DONE)
            return
        try:
            item: object = _FromClient(request, read_step(request.metadata))
            steptrace.mark("delivered", step=item.metadata.step_id)  # the stream reader's leg ends here
        except BadRequest as exc:
            item, self._stopped = exc, True
        await self._inbox.put(item)

    async def _read_client(self) -> None:
        try:
            async for request in self._requests:
                try:
                    item: object = _FromClient(request, read_step(request.metadata))
                except BadRequest as exc:
                    item = exc
                await self._inbox.put(item)
                if isinstance(item, BaseException) or self._hand_over():
                    return  # refused; or the queue is read out, and the reader delivers from here on
        except Exception as exc:  # the stream broke: the session learns it at its next read
            await self._inbox.put(exc)
            return
        await self._inbox.put(_CLIENT_DONE)

    async def next(self, timeout: float) -> tuple[runtime_pb2.ExpertRequest, StepMetadata] | None:
        """None when the client ended its stream or nothing came within `timeout`; BadRequest for a
        client's message whose metadata is refused."""
        if self._reader is None and not self._delivered and not self.client_done and not self._hand_over():
            self._reader = asyncio.get_running_loop().create_task(self._read_client())
        try:
            async with asyncio.timeout(timeout):
                item = await self._inbox.get()
        except TimeoutError:
            return None
        if isinstance(item, _FromClient):
            self.last_was_pushed = False
            return item.request, item.metadata
        if item is _CLIENT_DONE:
            self.client_done, self.last_was_pushed = True, False
            return None
        if isinstance(item, BaseException):
            self.client_done, self.last_was_pushed = True, False
            raise item
        self.last_was_pushed = True
        return item

    def close(self) -> None:
        self._stopped = True
        if self._reader is not None:
            self._reader.cancel()
        if self._delivered:  # a stream reader waiting for room in the inbox goes on (and drops the rest)
            while not self._inbox.empty():
                self._inbox.get_nowait()


@dataclass(frozen=True)
class _SessionArgs:
    """What a session's first message fixes for all its steps."""

    args_structure: object
    adapter: str | None


class InferenceMixin:
    """Inference sessions (rpc_inference): a session's parameters, its loop of token steps (from the
    client's stream or pushed by the previous server), and one step against the session's KV cache,
    joined with other sessions' steps where they can share a forward (step_batcher.py).

    Uses the handler's `limits`, `stats`, `budget`, `batcher`, `compute_queue`, `adapters`, `_traced`,
    `_last_compute`, `_last_inline`, `_hidden_states`, `_compute`, `_can_run_inline` and `_maybe_push`."""

    def _session_params(self, metadata: StepMetadata) -> tuple[int, float, str]:
        """A first message's max_length (required, within this server's limit), alloc_timeout and session id."""
        max_length = metadata.max_length
        if max_length is None:
            raise BadRequest("the first message of an inference session needs an integer max_length >= 0")
        if max_length > self.limits.inference_max_length:
            raise BadRequest(protocol.err_cannot_allocate(max_length, self.limits.inference_max_length))
        alloc_timeout = 0.0 if metadata.alloc_timeout is None else metadata.alloc_timeout
        return max_length, alloc_timeout, metadata.session_id or f"anonymous-{id(metadata)}"

    async def _run_session(
        self, span: BlockSpan, first, first_metadata: StepMetadata, requests, session: OpenSession, batch: int
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        max_length = first_metadata.max_length
        # Static (preallocated) where it pays and fits the session's reservation; else dynamic.
        reserved = self.budget.session_bytes(batch, max_length, span.num_blocks)
        cache = span.new_cache(max_length, batch=batch, reserved_bytes=reserved)
        inputs = SessionInputs(requests, session.pushes)
        self.stats.sessions_opened += 1
        self.stats.sessions_active += 1
        self.stats.sessions_peak = max(self.stats.sessions_peak, self.stats.sessions_active)
        processed_steps: set[str] = set()
        # Fixed for the session: read once, not at every token step.
        session_args = _SessionArgs(
            first_metadata.args_structure, block_args.check_adapter(first_metadata.active_adapter, self.adapters)
        )
        traced, read_at = self._traced, 0.0
        try:
            request, metadata = first, first_metadata
            while request is not None and len(request.tensors) > 0:  # an empty request closes the session
                step_id = metadata.step_id
                if step_id is None or step_id not in processed_steps:  # a duplicate step gets no reply
                    steptrace.mark("step_start", step=step_id, pushed=metadata.pushed)
                    queue_state = (self.compute_queue.busy, self.compute_queue.waiting) if traced else None
                    started = steptrace.now() if traced else 0.0
                    out = await self._inference_step(span, cache, request, metadata, session_args, batch, max_length)
                    steptrace.mark("computed", step=step_id)
                    serialized = serialize(out)
                    # The push first: it is on the chain's critical path, while the client reads this
                    # reply only after the previous servers' ones (and needs it only to fail over).
                    if self._maybe_push(serialized, request, metadata):
                        await asyncio.sleep(0)  # a push task: let it hand its bytes over before the reply
                    response = runtime_pb2.ExpertResponse(tensors=[serialized])
                    if metadata.pushed:  # the client may hold its own copy back (client/copies.py)
                        response.metadata = protocol.PUSHED_REPLY_METADATA
                    self.stats.bytes_out += response.ByteSize()
                    if traced:  # one line per step: where its time went (benchmarks/step_trace_report.py)
                        steptrace.mark(
                            "server_step",
                            session=first_metadata.session_id,
                            step=step_id,
                            read=read_at,
                            handler=started,
                            compute=self._last_compute,
                            reply=steptrace.now(),
                            queue=queue_state,
                            inline=self._last_inline,
                        )
                    yield response
                    steptrace.mark("replied", step=step_id)
                    if step_id is not None:
                        processed_steps.add(step_id)
                    if metadata.pushed:
                        self.stats.steps_from_pushes += 1
                else:
                    self.stats.duplicate_steps += 1
                received = await inputs.next(self.limits.step_timeout)
                request = None
                if received is not None:
                    request, metadata = received
                    self.stats.bytes_in += request.ByteSize()
                    if traced:
                        read_at = steptrace.now()
                        steptrace.mark("input", pushed=inputs.last_was_pushed, step=metadata.step_id)
                    if not inputs.last_was_pushed:
                        follow_named_upstream(session, metadata)
        finally:
            inputs.close()
            self.stats.sessions_active -= 1

    async def _inference_step(
        self,
        span: BlockSpan,
        cache: SessionCache | StaticSessionCache,
        request,
        metadata: StepMetadata,
        session_args: _SessionArgs,
        batch: int,
        max_length: int,
    ) -> torch.Tensor:
        tensors = deserialize_tensors(request.tensors)
        args, kwargs = unpack_args_kwargs(session_args.args_structure, tensors)
        hidden = self._hidden_states(args[0] if args else None, batch)
        prompts = block_args.deep_prompts(args[1] if len(args) > 1 else None, span, hidden) if hidden.shape[1] else None
        position = metadata.start_from_position  # an int >= 0 (read_step); the cache bounds it here
        past = cache.length  # read once (a few us each time): only a rollback changes it here
        if position is not None:
            if position > past:
                raise BadRequest(f"start_from_position must be an int in [0, {past}], got {position!r}")
            if position < past:
                try:
                    cache.rollback(position)
                except EngineError as exc:
                    raise BadRequest(str(exc)) from exc
                past = cache.length
        length = hidden.shape[1]
        if past + length > max_length:
            raise BadRequest(protocol.err_max_length_exceeded(past, length, max_length))
        hypo_ids = args[2] if len(args) > 2 else None
        if not is_dummy(hypo_ids):
            if hypo_ids.dtype != torch.int64 or tuple(hypo_ids.shape) != (batch,):
                raise BadRequest(f"hypo_ids must be int64 of shape [{batch}]")
            if bool(((hypo_ids < 0) | (hypo_ids >= batch)).any()):
                raise BadRequest("hypo_ids must index rows of the batch")
            cache.cache.reorder_cache(hypo_ids.to(span.device))
        if length == 0:
            return torch.empty(batch, 0, span.hidden_size, dtype=span.dtype)
        mask = block_args.padding_mask(kwargs, batch, past + length)
        position_ids = block_args.positions(mask, past, length)
        adapter = session_args.adapter
        inline = self._can_run_inline(batch * length)
        if not inline and prompts is None and length <= MAX_STEP_TOKENS and can_join(span, cache, length):
            try:
                out = await self.batcher.step(span, adapter, StepRow(cache, hidden, mask, position_ids))
            except EngineError as exc:
                raise BadRequest(str(exc)) from exc
        else:
            out = await self._compute(
                run_with_adapter(
                    adapter,
                    lambda: span(hidden, cache, attention_mask=mask, position_ids=position_ids, prompts=prompts),
                ),
                Priority.INFERENCE,
                inline=inline,
            )
        self._last_inline = inline
        self.stats.tokens_processed += batch * length
        self.stats.inference_steps += 1
        self.stats.lean_decode_steps = span.fast_path.lean_steps
        return out
