"""The RPC handler stock Petals clients and servers talk to.

Handle names are `TransformerConnectionHandler.rpc_*`: hivemind derives each libp2p protocol id from
the class and method names, so the class name below is part of the wire protocol. Every RPC
validates what the peer sent (packing.py) before allocating anything; a refused request gets an
error reply and leaves the server and its cache budget as they were.

Every peer may be hostile: each peer holds at most so many sessions and queued forward/backward
requests, sessions that reserve no cache do not take the slots of those that do, token steps run
ahead of forward/backward on the compute thread (compute_queue.py), stream messages are size-capped
before they are read (streams.py), and peer-supplied text is cut before it reaches a log or a reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

# hivemind tells streaming RPCs apart by `typing.AsyncIterator` annotations (not collections.abc's).
from typing import Any, AsyncIterator  # noqa: UP035

import torch
from google.protobuf.message import Message
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from corolla.swarm import protocol, steptrace
from corolla.swarm.models.batched_step import StepRow, can_join
from corolla.swarm.models.cache import SessionCache
from corolla.swarm.models.errors import EngineError
from corolla.swarm.models.span import BlockSpan
from corolla.swarm.models.static_cache import StaticSessionCache
from corolla.swarm.server import block_args
from corolla.swarm.server.adapters import run_with_adapter
from corolla.swarm.server.compute_queue import ComputeQueue, Priority
from corolla.swarm.server.forward_graphs import ForwardGraphs, KeptGraph, graph_key
from corolla.swarm.server.memory_cache import CacheBudget
from corolla.swarm.server.open_files import open_file_limit
from corolla.swarm.server.packing import (
    BadRequest,
    decode_metadata,
    deserialize_tensors,
    gather_stream,
    is_dummy,
    serialize,
    stream_parts,
    unpack_args_kwargs,
)
from corolla.swarm.server.refusals import RefusalBudget, RefusalLog, held_cap
from corolla.swarm.server.stats import ServerStats
from corolla.swarm.server.step_batcher import MAX_STEP_TOKENS, StepBatcher
from corolla.swarm.server.streams import TURNED_AWAY, StreamLimits, add_stream_handler

logger = logging.getLogger(__name__)
NONE_COMPRESSION = runtime_pb2.CompressionType.NONE
MAX_SESSION_ID_CHARS = 128
MAX_PUSH_BYTES = 2 * 1024 * 1024  # p2pd unary payloads (rpc_push) are capped at 2 MiB
# Single-token steps faster than this run on the event loop itself (a slow device never blocks it long).
INLINE_MAX_TOKENS = 8
INLINE_MAX_MS = 2.0
# Forward passes over more tokens than this run one block per compute job (see _forward_block_by_block).
PIECEWISE_MIN_TOKENS = 16


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
class _Session:
    """An open inference session: who opened it, which blocks, and where pushed steps go."""

    owner: PeerID
    chain: str
    pushes: asyncio.Queue
    pusher: PeerID | None = None
    reserving: bool = True


@dataclass
class _PeerLoad:
    sessions: Counter = field(default_factory=Counter)
    queued: Counter = field(default_factory=Counter)


class _SessionInputs:
    """The next message of an inference session: from the client's stream or a server's push."""

    def __init__(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], pushes: asyncio.Queue):
        self._requests, self._pushes = requests, pushes
        self._read: asyncio.Future | None = None
        self.client_done = False
        self.last_was_pushed = False

    async def next(self, timeout: float) -> runtime_pb2.ExpertRequest | None:
        """None when the client ended its stream or nothing came within `timeout`."""
        if self._read is None and not self.client_done:
            self._read = asyncio.ensure_future(anext(self._requests))
        waiters = {self._read} if self._read is not None else set()
        push = asyncio.ensure_future(self._pushes.get())
        try:
            done, _ = await asyncio.wait(waiters | {push}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:  # no waiter left on the queue: not after a step that came from the client, nor a teardown
            if not push.done():
                push.cancel()
        self.last_was_pushed = push in done
        if push in done:
            return push.result()
        if self._read in done:
            read, self._read = self._read, None
            try:
                return read.result()
            except StopAsyncIteration:
                self.client_done = True
                return None
        return None

    def close(self) -> None:
        if self._read is not None:
            self._read.cancel()


class TransformerConnectionHandler(ServicerBase):  # the name is on the wire: do not rename
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
        self.sessions: dict[str, _Session] = {}
        self.load = _PeerLoad()
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
        self._background: set[asyncio.Task] = set()
        # Moving average of step compute times; starts high so the first (cold) steps run off the loop.
        self._step_ms = INLINE_MAX_MS * 2
        self._traced = steptrace.enabled()
        self._last_compute = (0.0, 0.0)  # the last token step's compute stamps, for steptrace
        self._last_inline = False

    async def attach(self, p2p: P2P) -> None:
        self.p2p = p2p
        self._collect_rpc_handlers()
        registrations = []
        for rpc in self._rpc_handlers:
            name, method = self._get_handle_name(None, rpc.method_name), getattr(self, rpc.method_name)
            if rpc.stream_input and rpc.stream_output:
                # Our own registration, so that an error reply is not lost to p2pd's reset (streams.py).
                registrations.append(add_stream_handler(p2p, name, method, rpc.request_type, limits=self.stream_limits))
            else:
                registrations.append(
                    p2p.add_protobuf_handler(
                        name, method, rpc.request_type, stream_input=rpc.stream_input, stream_output=rpc.stream_output
                    )
                )
        await asyncio.gather(*registrations)

    async def detach(self) -> None:
        self.batcher.close()
        if self.p2p is not None:
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
                return timed()
            return await self.compute_queue.run(timed, priority)
        except EngineError as exc:
            raise BadRequest(str(exc)) from exc

    def _can_run_inline(self, tokens: int) -> bool:
        return tokens <= INLINE_MAX_TOKENS and self._step_ms < INLINE_MAX_MS

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
    async def _forward(
        self, uid: str, metadata: dict, tensors: list[torch.Tensor], peer: PeerID | None = None
    ) -> tuple[torch.Tensor, bool]:
        """The outputs, and whether this forward's graph was kept for the backward that follows."""
        span = self._chain(uid)
        args, kwargs = unpack_args_kwargs(metadata, tensors)
        if not args:
            raise BadRequest("forward needs hidden states")
        hidden = self._hidden_states(args[0])
        prompts = block_args.deep_prompts(args[1] if len(args) > 1 else None, span, hidden)
        mask = block_args.padding_mask(kwargs, hidden.shape[0], hidden.shape[1])
        adapter = block_args.check_adapter(metadata, self.adapters)
        self.stats.forward_requests += 1
        keep = graph_key(metadata, "corolla_keep_graph")  # a Corolla client's backward will follow
        kept = False
        if keep is None or peer is None:
            out = await asyncio.wait_for(
                self._forward_block_by_block(span, hidden, prompts, mask, adapter), self.limits.request_timeout
            )
        else:
            run = run_with_adapter(adapter, lambda: block_args.forward_keeping_graph(span, hidden, prompts, mask))
            out, leaf, prompt_leaf, graph = await asyncio.wait_for(
                self._compute(run, Priority.FORWARD), self.limits.request_timeout
            )
            nbytes = block_args.graph_nbytes(span, hidden)
            graph = KeptGraph(peer, uid, hidden, prompts, mask, leaf, prompt_leaf, graph, nbytes, 0.0)
            kept = self.graphs.keep(keep, graph)
        self.stats.tokens_processed += hidden.shape[0] * hidden.shape[1]
        return out, kept

    async def _forward_block_by_block(
        self,
        span: BlockSpan,
        hidden: torch.Tensor,
        prompts: torch.Tensor | None,
        mask: torch.Tensor | None,
        adapter: str | None,
    ) -> torch.Tensor:
        """A long forward pass, one compute job per block: a job on the thread cannot be interrupted,
        so a token step that arrives meanwhile waits for one block of it, not for the whole span (a
        full batch through a span takes as long as hundreds of token steps)."""
        pieces = [(span, prompts)]
        if hidden.shape[0] * hidden.shape[1] > PIECEWISE_MIN_TOKENS:
            pieces = block_args.one_block_each(span, prompts)
        for piece, piece_prompts in pieces:
            run = run_with_adapter(adapter, functools.partial(block_args.forward, piece, hidden, piece_prompts, mask))
            hidden = await self._compute(run, Priority.FORWARD)
        return hidden

    async def _backward(
        self, uid: str, metadata: dict, tensors: list[torch.Tensor], peer: PeerID | None = None
    ) -> list[torch.Tensor]:
        """[grad_inputs], plus grad_prompts when deep prompts were sent (Petals' reply). With
        GRAD_PREFIX_KEY (a Corolla client whose first positions alone need gradients: prompt tuning),
        grad_inputs covers only that many first positions."""
        prefix = metadata.get(protocol.GRAD_PREFIX_KEY)
        if prefix is not None and not (type(prefix) is int and prefix >= 1):
            raise BadRequest(f"{protocol.GRAD_PREFIX_KEY} must be a positive int, got {protocol.shorten(prefix)}")
        grads = await self._backward_grads(uid, metadata, tensors, peer)
        if prefix is not None and prefix < grads[0].shape[1]:
            grads[0] = grads[0][:, :prefix].contiguous()
        return grads

    async def _backward_grads(
        self, uid: str, metadata: dict, tensors: list[torch.Tensor], peer: PeerID | None
    ) -> list[torch.Tensor]:
        span = self._chain(uid)
        args, kwargs = unpack_args_kwargs(metadata, tensors)
        if len(args) < 2:
            raise BadRequest("backward needs inputs and grad_outputs")
        key = graph_key(metadata, "corolla_graph")
        if key is not None and is_dummy(args[0]):
            return await self._backward_kept(key, uid, args[1], peer)
        inputs = self._hidden_states(args[0])
        grad_outputs = args[1]
        if not isinstance(grad_outputs, torch.Tensor) or grad_outputs.shape != inputs.shape:
            raise BadRequest("grad_outputs must have the shape of the inputs")
        if not grad_outputs.is_floating_point():
            raise BadRequest("grad_outputs must be floating point")
        prompts = block_args.deep_prompts(args[2] if len(args) > 2 else None, span, inputs)
        mask = block_args.padding_mask(kwargs, inputs.shape[0], inputs.shape[1])
        adapter = block_args.check_adapter(metadata, self.adapters)
        self.stats.backward_requests += 1
        kept = None if key is None else self.graphs.take(key, peer, uid, inputs, prompts, mask)
        if kept is not None:  # the forward's graph: backpropagate without re-running it
            self.stats.backward_graphs_reused += 1
            run = functools.partial(block_args.backward_through, kept.out, kept.leaf, kept.prompt_leaf, grad_outputs)
        else:
            run = run_with_adapter(adapter, lambda: block_args.backward(span, inputs, grad_outputs, prompts, mask))
        return await asyncio.wait_for(
            self._compute(run, Priority.BACKWARD),
            self.limits.request_timeout,
        )

    async def _backward_kept(self, key: str, uid: str, grad_outputs: Any, peer: PeerID | None) -> list[torch.Tensor]:
        """A backward request that sends no inputs: those of the forward graph this peer had kept."""
        kept = None if peer is None else self.graphs.take_trusted(key, peer, uid)
        if kept is None:
            raise BadRequest(protocol.ERR_GRAPH_GONE)
        if not isinstance(grad_outputs, torch.Tensor) or grad_outputs.shape != kept.inputs.shape:
            raise BadRequest("grad_outputs must have the shape of the inputs")
        if not grad_outputs.is_floating_point():
            raise BadRequest("grad_outputs must be floating point")
        self.stats.backward_requests += 1
        self.stats.backward_graphs_reused += 1
        run = functools.partial(block_args.backward_through, kept.out, kept.leaf, kept.prompt_leaf, grad_outputs)
        return await asyncio.wait_for(self._compute(run, Priority.BACKWARD), self.limits.request_timeout)

    @staticmethod
    def _forward_reply_metadata(kept: bool) -> bytes:
        return MSGPackSerializer.dumps({protocol.GRAPH_KEPT_KEY: True}) if kept else b""

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        await self._admit(context.remote_id, request)
        try:
            self.stats.bytes_in += request.ByteSize()
            async with self._queued(context.remote_id):
                out, kept = await self._forward(
                    request.uid,
                    decode_metadata(request.metadata),
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
                    decode_metadata(request.metadata),
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

    async def _gather(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> tuple[str, dict, list]:
        try:
            async with asyncio.timeout(self.limits.request_timeout):
                uid, metadata, tensors = await gather_stream(
                    requests, max_bytes=self.max_request_bytes, max_messages=self.limits.max_stream_messages
                )
        except TimeoutError as exc:
            raise BadRequest(f"the request stream did not end within {self.limits.request_timeout} s") from exc
        self.stats.bytes_in += sum(t.numel() * t.element_size() for t in tensors)
        return uid, metadata, tensors

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
            metadata = decode_metadata(first.metadata)
            max_length, alloc_timeout, session_id = self._session_params(metadata)
            block_args.check_adapter(metadata, self.adapters)
            batch = first.tensors[0].size[0] if first.tensors and first.tensors[0].size else 1
            if not 1 <= batch <= self.limits.max_batch_size:
                raise BadRequest(f"batch size {batch} is outside [1, {self.limits.max_batch_size}]")
            self._check_session_slot(context.remote_id, session_id, reserving=max_length > 0)
            nbytes = self.budget.session_bytes(batch, max_length, span.num_blocks)
        except BadRequest as exc:
            self._refused(exc, context.remote_id)
            raise
        # Registered before waiting for cache, so that waiting sessions count against the caps too.
        session = _Session(context.remote_id, first.uid, asyncio.Queue(maxsize=16), reserving=max_length > 0)
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

    def _session_params(self, metadata: dict) -> tuple[int, float, str]:
        max_length = metadata.get("max_length")
        if type(max_length) is not int or max_length < 0:
            raise BadRequest("the first message of an inference session needs an integer max_length >= 0")
        if max_length > self.limits.inference_max_length:
            raise BadRequest(protocol.err_cannot_allocate(max_length, self.limits.inference_max_length))
        alloc_timeout = metadata.get("alloc_timeout", 0.0)
        if type(alloc_timeout) not in (int, float) or alloc_timeout < 0:
            raise BadRequest("alloc_timeout must be a number >= 0")
        session_id = metadata.get("session_id")
        if session_id is not None and (not isinstance(session_id, str) or len(session_id) > MAX_SESSION_ID_CHARS):
            raise BadRequest("session_id must be a string of at most 128 characters")
        return max_length, float(alloc_timeout), session_id or f"anonymous-{id(metadata)}"

    async def _run_session(
        self, span: BlockSpan, first, first_metadata: dict, requests, session: _Session, batch: int
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        max_length = first_metadata["max_length"]
        # Static (preallocated) where it pays and fits the session's reservation; else dynamic.
        reserved = self.budget.session_bytes(batch, max_length, span.num_blocks)
        cache = span.new_cache(max_length, batch=batch, reserved_bytes=reserved)
        inputs = _SessionInputs(requests, session.pushes)
        self.stats.sessions_opened += 1
        self.stats.sessions_active += 1
        self.stats.sessions_peak = max(self.stats.sessions_peak, self.stats.sessions_active)
        processed_steps: set[str] = set()
        traced, read_at = self._traced, 0.0
        try:
            request, metadata = first, first_metadata
            while request is not None and len(request.tensors) > 0:  # an empty request closes the session
                step_id = metadata.get("step_id")
                if step_id is not None and (not isinstance(step_id, str) or len(step_id) > MAX_SESSION_ID_CHARS):
                    raise BadRequest("step_id must be a string of at most 128 characters")
                if step_id is None or step_id not in processed_steps:  # a duplicate step gets no reply
                    steptrace.mark("step_start", step=step_id, pushed=metadata.get("pushed") is True)
                    queue_state = (self.compute_queue.busy, self.compute_queue.waiting) if traced else None
                    started = steptrace.now() if traced else 0.0
                    out = await self._inference_step(span, cache, request, metadata, first_metadata, batch, max_length)
                    steptrace.mark("computed", step=step_id)
                    serialized = serialize(out)
                    # The push first: it is on the chain's critical path, while the client reads this
                    # reply only after the previous servers' ones (and needs it only to fail over).
                    if self._maybe_push(serialized, request, metadata):
                        await asyncio.sleep(0)  # let the push task hand its bytes to p2pd before the reply
                    response = runtime_pb2.ExpertResponse(tensors=[serialized])
                    self.stats.bytes_out += response.ByteSize()
                    if traced:  # one line per step: where its time went (benchmarks/step_trace_report.py)
                        steptrace.mark(
                            "server_step",
                            session=first_metadata.get("session_id"),
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
                    if isinstance(step_id, str):
                        processed_steps.add(step_id)
                    if metadata.get("pushed") is True:
                        self.stats.steps_from_pushes += 1
                request = await inputs.next(self.limits.step_timeout)
                if request is not None and traced:
                    read_at = steptrace.now()
                    step = decode_metadata(request.metadata).get("step_id")
                    steptrace.mark("input", pushed=inputs.last_was_pushed, step=step)
                if request is not None:
                    self.stats.bytes_in += request.ByteSize()
                    metadata = decode_metadata(request.metadata)
                    if not inputs.last_was_pushed:
                        _follow_named_upstream(session, metadata)
        finally:
            inputs.close()
            self.stats.sessions_active -= 1

    async def _inference_step(
        self,
        span: BlockSpan,
        cache: SessionCache | StaticSessionCache,
        request,
        metadata: dict,
        first_metadata: dict,
        batch: int,
        max_length: int,
    ) -> torch.Tensor:
        tensors = deserialize_tensors(request.tensors)
        args, kwargs = unpack_args_kwargs({"args_structure": first_metadata.get("args_structure")}, tensors)
        hidden = self._hidden_states(args[0] if args else None, batch)
        prompts = block_args.deep_prompts(args[1] if len(args) > 1 else None, span, hidden) if hidden.shape[1] else None
        position = metadata.get("start_from_position")
        if position is not None:
            if type(position) is not int or position < 0 or position > cache.length:
                raise BadRequest(f"start_from_position must be an int in [0, {cache.length}], got {position!r}")
            if position < cache.length:
                try:
                    cache.rollback(position)
                except EngineError as exc:
                    raise BadRequest(str(exc)) from exc
        length = hidden.shape[1]
        if cache.length + length > max_length:
            raise BadRequest(protocol.err_max_length_exceeded(cache.length, length, max_length))
        hypo_ids = args[2] if len(args) > 2 else None
        if not is_dummy(hypo_ids):
            if hypo_ids.dtype != torch.int64 or tuple(hypo_ids.shape) != (batch,):
                raise BadRequest(f"hypo_ids must be int64 of shape [{batch}]")
            if bool(((hypo_ids < 0) | (hypo_ids >= batch)).any()):
                raise BadRequest("hypo_ids must index rows of the batch")
            cache.cache.reorder_cache(hypo_ids.to(span.device))
        if length == 0:
            return torch.empty(batch, 0, span.hidden_size, dtype=span.dtype)
        mask = block_args.padding_mask(kwargs, batch, cache.length + length)
        position_ids = block_args.positions(mask, cache.length, length)
        adapter = block_args.check_adapter(first_metadata, self.adapters)
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
        return out

    # --- server-to-server pushes ---------------------------------------------------------------------
    def _maybe_push(self, out: runtime_pb2.Tensor, request, metadata: dict) -> bool:
        """Send this step's output to the next server of the chain when the step names one.

        The pushed copy carries this step's own trailing tensors (Petals' servers send the first
        request's, which is wrong for a step that reorders beams); a step with deep prompts or a padding
        mask is never pushed, as in Petals (those are per span, the next server needs its own). `out` is
        the serialized output; returns whether a push was started."""
        next_servers = metadata.get("next_servers")
        if not next_servers or self.p2p is None or not isinstance(next_servers, (list, tuple)):
            return False
        if len(request.tensors) > 3 or (len(request.tensors) > 1 and _numel(request.tensors[1]) > 0):
            return False
        if len(out.buffer) > MAX_PUSH_BYTES:  # a long prompt's output: rpc_push is unary, p2pd would refuse it
            return False
        try:
            peer_b58, next_session, start, end = next_servers[0]
            if not isinstance(next_session, str) or len(next_session) > MAX_SESSION_ID_CHARS:
                raise ValueError("bad session id")
            if len(next_servers) > protocol.MAX_CHAIN_LENGTH:
                raise ValueError("too long a chain")
            if (
                type(start) is not int
                or type(end) is not int
                or not 0 <= start < end <= start + protocol.MAX_CHAIN_LENGTH
            ):
                raise ValueError(f"bad block range {start!r}:{end!r}")
            uid = protocol.chain_uids(self.dht_prefix, start, end)
            push_metadata = {
                **metadata,
                "session_id": next_session,
                "next_servers": list(next_servers[1:]),
                "pushed": True,
            }
            request = runtime_pb2.ExpertRequest(
                uid=uid, tensors=[out, *request.tensors[1:]], metadata=MSGPackSerializer.dumps(push_metadata)
            )
            peer = PeerID.from_base58(peer_b58)
        except Exception as exc:  # a malformed next_servers entry only disables the optimisation
            logger.debug("not pushing: %s", protocol.shorten(str(exc)))
            return False
        self.stats.pushes_sent += 1
        task = asyncio.create_task(self._push(peer, request))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return True

    async def _push(self, peer: PeerID, request: runtime_pb2.ExpertRequest) -> None:
        try:
            stub = self.get_stub(self.p2p, peer)
            steptrace.mark("push_send")
            await stub.rpc_push(request, timeout=self.limits.request_timeout)
            steptrace.mark("push_acked")
        except Exception as exc:
            logger.debug("push to %s failed: %s", peer, protocol.shorten(str(exc)))

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A previous server's output for one of this server's sessions (old clients' server-to-server
        push). Accepted only into a session that is open here, over the same blocks, and only from one
        pusher per session: the upstream server the client names, else the first peer that pushes to it."""
        await self._admit(context.remote_id, request)
        try:
            metadata = decode_metadata(request.metadata)
            steptrace.mark("push_received", step=metadata.get("step_id"))
            self._chain(request.uid)
            session_id = metadata.get("session_id")
            session = self.sessions.get(session_id) if isinstance(session_id, str) else None
            if session is None:
                raise BadRequest("rpc_push: no open session with this id")
            if request.uid != session.chain:
                raise BadRequest("rpc_push: these blocks are not the session's")
            if session.pusher is not None and session.pusher != context.remote_id:
                raise BadRequest("rpc_push: another peer pushes to this session")
            if session.pushes.full():
                raise BadRequest("rpc_push: the session's queue of pushed steps is full")
        except BadRequest as exc:
            self._refused(exc, context.remote_id)
            raise
        session.pusher = context.remote_id
        session.pushes.put_nowait(request)
        self.stats.pushes_received += 1
        return runtime_pb2.ExpertResponse()


def _follow_named_upstream(session: _Session, metadata: dict) -> None:
    """A Corolla client names the server that pushes into this session (`corolla_upstream`), so after a
    failover the replacement upstream may push here; without it, the first peer to push keeps the role."""
    named = metadata.get("corolla_upstream")
    if isinstance(named, str) and len(named) <= MAX_SESSION_ID_CHARS:
        with contextlib.suppress(Exception):
            session.pusher = PeerID.from_base58(named)


def _numel(tensor: runtime_pb2.Tensor) -> int:
    count = 1
    for dim in tensor.size:
        count *= dim
    return count
