"""The RPC handler stock Petals clients and servers talk to.

Handle names are `TransformerConnectionHandler.rpc_*`: hivemind derives each libp2p protocol id from
the class and method names, so the class name below is part of the wire protocol. Every RPC
validates what the peer sent (packing.py) before allocating anything; a refused request gets an
error reply and leaves the server and its cache budget as they were.

This module is the shell: the handler's state and its rpc_* methods. Their work lives in one module
per kind: admission.py (caps and refusals, first for every RPC), training.py (forward/backward),
inference.py (sessions and token steps) and push.py (server-to-server push). Token steps run ahead
of forward/backward on the compute thread (compute_queue.py), stream messages are size-capped before
they are read (streams.py), and peer-supplied text is cut before it reaches a log or a reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

# hivemind tells streaming RPCs apart by `typing.AsyncIterator` annotations (not collections.abc's).
from typing import Any, AsyncIterator  # noqa: UP035

import torch
from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from corolla.swarm import direct_link, protocol, steptrace
from corolla.swarm.models.errors import EngineError
from corolla.swarm.models.span import BlockSpan
from corolla.swarm.server import block_args
from corolla.swarm.server.admission import AdmissionMixin, HandlerLimits, PeerLoad
from corolla.swarm.server.compute_queue import ComputeQueue, Priority
from corolla.swarm.server.forward_graphs import ForwardGraphs
from corolla.swarm.server.inference import InferenceMixin, OpenSession
from corolla.swarm.server.memory_cache import CacheBudget
from corolla.swarm.server.open_files import open_file_limit
from corolla.swarm.server.packing import (
    BadRequest,
    deserialize_tensors,
    read_call,
    read_step,
    serialize,
    stream_parts,
)
from corolla.swarm.server.push import PushMixin
from corolla.swarm.server.refusals import RefusalBudget, RefusalLog, held_cap
from corolla.swarm.server.stats import ServerStats
from corolla.swarm.server.step_batcher import StepBatcher
from corolla.swarm.server.step_threads import StepThreads
from corolla.swarm.server.streams import StreamLimits, add_stream_handler
from corolla.swarm.server.training import TrainingMixin

__all__ = ["HandlerLimits", "TransformerConnectionHandler"]
logger = logging.getLogger(__name__)
NONE_COMPRESSION = runtime_pb2.CompressionType.NONE
# Single-token steps faster than this run on the event loop itself (a slow device never blocks it long).
INLINE_MAX_TOKENS = 8
INLINE_MAX_MS = 2.0


class TransformerConnectionHandler(AdmissionMixin, TrainingMixin, InferenceMixin, PushMixin, ServicerBase):
    """The RPCs (their names are on the wire: do not rename the class or the rpc_* methods) over the
    handler's shared state; the work of each kind of RPC is in its mixin's module."""

    def __init__(
        self,
        span: BlockSpan,
        dht_prefix: str,
        budget: CacheBudget,
        limits: HandlerLimits,
        stats: ServerStats,
        executor: ThreadPoolExecutor,
        dht_client_mode: Callable[[], bool] = lambda: False,
    ):
        self.span, self.dht_prefix, self.budget, self.limits = span, dht_prefix, budget, limits
        self.stats, self.executor, self.dht_client_mode = stats, executor, dht_client_mode
        self.block_of_uid = {protocol.make_uid(dht_prefix, i): i for i in range(span.start, span.end)}
        self.sessions: dict[str, OpenSession] = {}
        self.load = PeerLoad()
        self.compute_queue = ComputeQueue(executor)
        # Token steps of several sessions that wait at once share one forward (step_batcher.py).
        self.batcher = StepBatcher(
            run_on_thread=lambda job: self._compute(job, Priority.INFERENCE),
            bytes_per_token=2 * span.family.kv_dim(span.config) * span.dtype.itemsize * span.num_blocks,
            stats=stats,
        )
        self.graphs = ForwardGraphs()
        # The largest message an honest peer sends: a full batch of float32 hidden states (inference
        # sends it whole), or one 4 MiB chunk of a forward/backward stream; plus metadata and framing.
        largest = max(limits.max_batch_size * (span.hidden_size * 4 + 8), protocol.STREAM_CHUNK_BYTES)
        max_message = largest + protocol.MAX_METADATA_BYTES + 64 * 1024
        # A whole forward/backward request: hidden states (and, for backward, their gradients).
        self.max_request_bytes = 2 * limits.max_batch_size * span.hidden_size * 4 + 1024 * 1024
        self.refusals = None
        if limits.refusal_burst is not None:
            self.refusals = RefusalBudget(
                limits.refusal_burst,
                limits.refusals_per_s,
                self._count_turned_away,
                self._count_held,
                max_held=held_cap(open_file_limit()),
            )
        self.refusal_log = RefusalLog(logger)
        self.stream_limits = StreamLimits(
            max_message_bytes=max_message,
            buffered_bytes=2 * max_message + 16 * 1024 * 1024,
            streams_per_peer=2 * limits.max_sessions_per_peer,
            refusals=self.refusals,
            refusal_log=self.refusal_log,
        )
        self.adapters: tuple[str, ...] = ()  # LoRA adapters this server can activate (none yet)
        self.p2p: P2P | None = None
        # (bind host, port, advertised hosts) of the direct link for Corolla clients (direct_link.py)
        self.direct_link_at: tuple[str, int, list[str]] | None = None
        self.direct_link: direct_link.DirectLinkServer | None = None
        self._background: set[asyncio.Task] = set()
        # Moving average of step compute times; starts high so the first (cold) steps run off the loop.
        self._step_ms = INLINE_MAX_MS * 2
        self._traced = steptrace.enabled()
        self._last_compute = (0.0, 0.0)  # the last token step's compute stamps, for steptrace
        self._last_inline = False
        self.step_threads = StepThreads(torch.get_num_threads())  # for the steps run inline (step_threads.py)

    async def attach(self, p2p: P2P) -> None:
        self.p2p = p2p
        self._collect_rpc_handlers()
        registrations = []
        inference = None
        for rpc in self._rpc_handlers:
            name, method = self._get_handle_name(None, rpc.method_name), getattr(self, rpc.method_name)
            if rpc.stream_input and rpc.stream_output:
                # Our own registration, so that an error reply is not lost to p2pd's reset (streams.py).
                registration = add_stream_handler(p2p, name, method, rpc.request_type, limits=self.stream_limits)
                if rpc.method_name == "rpc_inference":
                    inference = registration = asyncio.ensure_future(registration)
                registrations.append(registration)
            else:
                registrations.append(
                    p2p.add_protobuf_handler(
                        name, method, rpc.request_type, stream_input=rpc.stream_input, stream_output=rpc.stream_output
                    )
                )
        await asyncio.gather(*registrations)
        push = await self._attach_push_stream(p2p)  # Corolla servers only (push_stream.py)
        if self.direct_link_at is not None and inference is not None:  # Corolla peers only (direct_link.py)
            bind, port, hosts = self.direct_link_at
            handles = {direct_link.INFERENCE: inference.result(), direct_link.PUSH: push}
            self.direct_link = direct_link.DirectLinkServer(handles, bind, port, hosts, self.limits.step_timeout)
            await self.direct_link.start(p2p)

    async def detach(self) -> None:
        self.batcher.close()
        if self.direct_link is not None:
            await self.direct_link.close(self.p2p)
        if self.p2p is not None:
            await self._detach_push_stream(self.p2p)
            await self.remove_p2p_handlers(self.p2p)

    # --- helpers ---------------------------------------------------------------------------------
    def _chain(self, uids: str) -> BlockSpan:
        """The sub-span a chained uid string names; consecutive blocks of ours, in order."""
        if len(uids) > protocol.MAX_CHAIN_LENGTH * 256:
            raise BadRequest(protocol.err_not_served(uids))  # cut short: never echo a huge uid whole
        parts = uids.split(protocol.CHAIN_DELIMITER)
        if len(parts) > protocol.MAX_CHAIN_LENGTH:
            raise BadRequest(f"a chain of {len(parts)} uids is longer than the limit {protocol.MAX_CHAIN_LENGTH}")
        blocks = []
        for uid in parts:
            if uid not in self.block_of_uid:
                raise BadRequest(protocol.err_not_served(uid))
            blocks.append(self.block_of_uid[uid])
        if blocks != list(range(blocks[0], blocks[0] + len(blocks))):
            raise BadRequest(f"chained uids must name consecutive blocks in order, got {protocol.shorten(blocks)}")
        return self.span.sub(blocks[0], blocks[-1] + 1)

    def _hidden_states(self, value: Any, batch: int | None = None) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or value.ndim != 3 or not value.is_floating_point():
            raise BadRequest("the first tensor must be floating hidden states [batch, length, hidden]")
        if value.shape[2] != self.span.hidden_size:
            raise BadRequest(f"hidden size is {value.shape[2]}, this model's is {self.span.hidden_size}")
        if batch is not None and value.shape[0] != batch:
            raise BadRequest(f"batch size changed from {batch} to {value.shape[0]} within a session")
        if value.shape[0] * value.shape[1] > self.limits.max_batch_size:
            raise BadRequest(
                f"Task size greater than max_batch_size ({self.limits.max_batch_size}), it can't be processed"
            )
        return value

    async def _compute(
        self, fn: Callable[[], torch.Tensor], priority: Priority = Priority.INFERENCE, inline: bool = False
    ) -> torch.Tensor:
        """Run on the compute thread in priority order; or, for steps known to take well under a
        millisecond or two, right here on the event loop, which saves two thread hand-offs per token."""

        def timed() -> torch.Tensor:
            started = time.perf_counter()
            out = fn()
            if priority == Priority.INFERENCE:  # what a token step costs, not someone's full batch
                ended = time.perf_counter()
                self._step_ms = 0.8 * self._step_ms + 0.2 * (ended - started) * 1000
                if self._traced:  # the same interval on the trace's clock
                    wall_end = steptrace.now()
                    self._last_compute = (wall_end - (ended - started), wall_end)
            return out

        try:
            if inline:
                return self.step_threads.run(timed)
            return await self.compute_queue.run(timed, priority)
        except EngineError as exc:
            raise BadRequest(str(exc)) from exc

    def _can_run_inline(self, tokens: int) -> bool:
        return tokens <= INLINE_MAX_TOKENS and self._step_ms < INLINE_MAX_MS

    # --- rpc_info ----------------------------------------------------------------------------------
    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        info: dict[str, Any] = {
            "version": protocol.PETALS_COMPAT_VERSION,
            "dht_client_mode": bool(self.dht_client_mode()),
            "cache_tokens_available": self.budget.tokens_left_rpc_info,
        }
        if request.uid:
            if request.uid not in self.block_of_uid:  # err_not_served cuts the echoed uid
                raise BadRequest(protocol.err_not_served(request.uid))
            dtype = self.span.dtype
            hidden = BatchTensorDescriptor(1, 2048, self.span.hidden_size, dtype=dtype, compression=NONE_COMPRESSION)
            info["forward_schema"] = ((hidden,), {})
            info["outputs_schema"] = (hidden,)
            info["keyword_names"] = ()
            info["inference_schema"] = (
                (hidden, BatchTensorDescriptor((), dtype=dtype), BatchTensorDescriptor((), dtype=torch.int64)),
                {},
            )
        return runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps(info))

    # --- forward and backward ----------------------------------------------------------------------

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        await self._admit(context.remote_id, request)
        try:
            self.stats.bytes_in += request.ByteSize()
            async with self._queued(context.remote_id):
                out, kept = await self._forward(
                    request.uid,
                    read_call(request.metadata),
                    deserialize_tensors(request.tensors),
                    context.remote_id,
                )
        except (BadRequest, TimeoutError) as exc:
            self._refused(exc, context.remote_id)
            raise
        response = runtime_pb2.ExpertResponse(tensors=[serialize(out)], metadata=self._forward_reply_metadata(kept))
        self.stats.bytes_out += response.ByteSize()
        return response

    async def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertRequest]:  # Petals declares ExpertRequest here; same wire bytes
        try:
            async with self._queued(context.remote_id):
                uid, metadata, tensors = await self._gather(requests)
                out, kept = await self._forward(uid, metadata, tensors, context.remote_id)
        except (BadRequest, TimeoutError) as exc:
            self._refused(exc, context.remote_id)
            raise
        reply_metadata = self._forward_reply_metadata(kept)
        for part in stream_parts(serialize(out)):
            self.stats.bytes_out += part.ByteSize()
            yield runtime_pb2.ExpertRequest(tensors=[part], metadata=reply_metadata)
            reply_metadata = b""  # on the first message only

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        await self._admit(context.remote_id, request)
        try:
            self.stats.bytes_in += request.ByteSize()
            async with self._queued(context.remote_id):
                grad = await self._backward(
                    request.uid,
                    read_call(request.metadata),
                    deserialize_tensors(request.tensors),
                    context.remote_id,
                )
        except (BadRequest, TimeoutError) as exc:
            self._refused(exc, context.remote_id)
            raise
        response = runtime_pb2.ExpertResponse(tensors=[serialize(g) for g in grad])
        self.stats.bytes_out += response.ByteSize()
        return response

    async def rpc_backward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            async with self._queued(context.remote_id):
                uid, metadata, tensors = await self._gather(requests)
                grad = await self._backward(uid, metadata, tensors, context.remote_id)
        except (BadRequest, TimeoutError) as exc:
            self._refused(exc, context.remote_id)
            raise
        for part in [p for g in grad for p in stream_parts(serialize(g))]:
            self.stats.bytes_out += part.ByteSize()
            yield runtime_pb2.ExpertResponse(tensors=[part])

    # --- inference sessions ------------------------------------------------------------------------
    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            first = await asyncio.wait_for(anext(requests), self.limits.step_timeout)
        except (StopAsyncIteration, TimeoutError):
            return
        try:
            self.stats.bytes_in += first.ByteSize()
            span = self._chain(first.uid)
            metadata = read_step(first.metadata)
            max_length, alloc_timeout, session_id = self._session_params(metadata)
            block_args.check_adapter(metadata.active_adapter, self.adapters)
            batch = first.tensors[0].size[0] if first.tensors and first.tensors[0].size else 1
            if not 1 <= batch <= self.limits.max_batch_size:
                raise BadRequest(f"batch size {batch} is outside [1, {self.limits.max_batch_size}]")
            self._check_session_slot(context.remote_id, session_id, reserving=max_length > 0)
            nbytes = self.budget.session_bytes(batch, max_length, span.num_blocks)
        except BadRequest as exc:
            self._refused(exc, context.remote_id)
            raise
        # Registered before waiting for cache, so that waiting sessions count against the caps too.
        session = OpenSession(context.remote_id, first.uid, asyncio.Queue(maxsize=16), reserving=max_length > 0)
        self.sessions[session_id] = session
        self.load.sessions[session.owner] += 1
        try:
            async with asyncio.timeout(self.limits.session_timeout), self.budget.allocate(nbytes, alloc_timeout):
                async for response in self._run_session(span, first, metadata, requests, session, batch):
                    yield response
        except Exception as exc:
            self._refused(exc, context.remote_id)
            raise
        finally:
            self.sessions.pop(session_id, None)
            self.load.sessions[session.owner] -= 1
            if not self.load.sessions[session.owner]:
                del self.load.sessions[session.owner]

    # --- server-to-server pushes ---------------------------------------------------------------------

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A previous server's output for one of this server's sessions (server-to-server push)."""
        await self._admit(context.remote_id, request)
        try:
            self._take_push(request, context.remote_id)
        except BadRequest as exc:
            self._refused(exc, context.remote_id)
            raise
        return runtime_pb2.ExpertResponse()
