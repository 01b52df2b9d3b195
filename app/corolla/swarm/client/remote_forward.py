"""Forward and backward passes through the swarm's blocks (rpc_forward / rpc_backward), for training.

Stateless calls, so failures are cheap to survive: a server that fails is banned and its blocks are
re-routed; a backward pass through a replacement route first re-runs the forward pass of that route
to get its intermediate inputs. Requests follow Petals' formats: tensors [hidden, prompts] (forward),
[inputs, grad_outputs, prompts] (backward) under `args_structure`, unary up to 1 MiB of inputs and
streamed in 4 MiB parts above it; large batches are split into chunks of at most 1024 tokens that
run concurrently. A padding mask goes to Corolla servers as the `attention_mask` keyword.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p.p2p_daemon_bindings.utils import P2PHandlerError
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from corolla.swarm import protocol
from corolla.swarm.client.privacy import PrivacyViolation
from corolla.swarm.client.routing import MissingBlocksError, PrivacyCoverageError, RouteSegment, SwarmView
from corolla.swarm.step_metadata import CallMetadata, ForwardReply

logger = logging.getLogger(__name__)
MAX_UNARY_BYTES = 1024 * 1024  # Petals: MAX_UNARY_PAYLOAD_SIZE // 2
MAX_TOKENS_PER_REQUEST = 1024  # Petals' MAX_TOKENS_IN_BATCH
CHUNKS_IN_FLIGHT = 3  # per server: under a server's cap on queued forward/backward requests per peer (4)
MAX_REPLY_BYTES = protocol.MAX_REQUEST_BYTES
_DUMMY = torch.zeros(0)


class RemoteCallFailed(RuntimeError):
    pass


@dataclass
class Hop:
    """One segment's part of a forward pass: what it received (kept for the backward pass), and the
    names under which a Corolla server keeps each chunk's forward graph for that backward pass."""

    segment: RouteSegment
    inputs: torch.Tensor
    graph_keys: list[str] = field(default_factory=list)
    graphs_kept: list[bool] = field(default_factory=list)  # per chunk: the server said it kept the graph


def _request_tensors(args: list[torch.Tensor], mask: torch.Tensor | None) -> tuple[list, tuple]:
    """The serialized tensors and the `args_structure` that names them (the mask as a keyword)."""
    structure_args = tuple(f"__T{i}".encode() for i in range(len(args)))
    kwargs = {}
    tensors = list(args)
    if mask is not None:
        kwargs["attention_mask"] = f"__T{len(tensors)}".encode()
        tensors.append(mask)
    return [serialize_torch_tensor(t.contiguous()) for t in tensors], (structure_args, kwargs)


async def _call(
    view: SwarmView,
    segment: RouteSegment,
    method: str,
    args: list[torch.Tensor],
    mask: torch.Tensor | None,
    adapter: str | None,
    timeout: float,
    extensions: CallMetadata | None = None,
) -> list[torch.Tensor]:
    """One rpc_forward/rpc_backward call (unary or streamed by size); returns the reply's tensors."""
    tensors, _ = await _call_with_reply_metadata(view, segment, method, args, mask, adapter, timeout, extensions)
    return tensors


async def _call_with_reply_metadata(
    view: SwarmView,
    segment: RouteSegment,
    method: str,
    args: list[torch.Tensor],
    mask: torch.Tensor | None,
    adapter: str | None,
    timeout: float,
    extensions: CallMetadata | None = None,
) -> tuple[list[torch.Tensor], ForwardReply]:
    """`_call`, also returning the reply's metadata (Corolla servers say there whether they kept the
    forward graph; stock servers send none). `extensions`: Corolla's training keys (kept graphs, the
    gradient prefix); the tensors' structure and the adapter are filled in here."""
    uid = protocol.chain_uids(view.dht_prefix, segment.start, segment.end)
    serialized, structure = _request_tensors(args, mask)
    metadata = dataclasses.replace(extensions or CallMetadata(), args_structure=structure, active_adapter=adapter)
    packed = metadata.pack()
    stub = view.stub(segment.peer_id)  # refuses a peer outside the privacy policy
    size = sum(t.numel() * t.element_size() for t in args)
    if size <= MAX_UNARY_BYTES:
        request = runtime_pb2.ExpertRequest(uid=uid, tensors=serialized, metadata=packed)
        response = await asyncio.wait_for(getattr(stub, method)(request), timeout)
        protos = list(response.tensors)
        reply = ForwardReply.decode(response.metadata)
    else:

        async def parts() -> AsyncIterator[runtime_pb2.ExpertRequest]:
            for tensor in serialized:
                for part in split_for_streaming(tensor, protocol.STREAM_CHUNK_BYTES):
                    yield runtime_pb2.ExpertRequest(uid=uid, tensors=[part], metadata=packed)

        protos, reply = [], ForwardReply()
        async with asyncio.timeout(timeout):
            total = 0
            async for response in await getattr(stub, f"{method}_stream")(parts()):
                if response.metadata and not reply.graph_kept:
                    reply = ForwardReply.decode(response.metadata)
                for part in response.tensors:
                    total += len(part.buffer)
                    if total > MAX_REPLY_BYTES:
                        raise RemoteCallFailed("the server's reply is larger than the limit")
                    if part.dtype or not protos:
                        protos.append(part)
                    else:
                        protos[-1] = runtime_pb2.Tensor(
                            buffer=protos[-1].buffer + part.buffer,
                            size=protos[-1].size,
                            dtype=protos[-1].dtype,
                            compression=protos[-1].compression,
                            requires_grad=protos[-1].requires_grad,
                        )
    if len(protos) > protocol.MAX_TENSORS_PER_REQUEST:
        raise RemoteCallFailed(f"the server replied with {len(protos)} tensors")
    return [deserialize_torch_tensor(p) for p in protos], reply


def _full_input_grads(grads: torch.Tensor, inputs: torch.Tensor, prefix: int | None) -> torch.Tensor:
    """Input gradients of the inputs' shape: a Corolla server asked for a prefix sends only its
    positions (the rest are zeros here), a stock server sends them all."""
    if prefix is None or prefix >= inputs.shape[1] or tuple(grads.shape) == tuple(inputs.shape):
        return _expect(grads, inputs.shape, "input gradients").to(inputs.dtype)
    _expect(grads, (inputs.shape[0], prefix, *inputs.shape[2:]), "input gradients")
    full = inputs.new_zeros(inputs.shape)
    full[:, :prefix] = grads
    return full


def _expect(tensor: torch.Tensor, shape: tuple, what: str) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise RemoteCallFailed(f"server returned {what} of shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    return tensor


class RemoteBlocks:
    """Forward and backward over blocks [0, num_blocks) of the swarm, with retries and re-routing."""

    def __init__(self, view: SwarmView, adapter: str | None = None):
        self.view, self.adapter = view, adapter
        self.last_route: list[RouteSegment] = []  # the segments of the latest full forward pass

    # --- one segment, with the batch split into chunks --------------------------------------------
    async def _segment_forward(
        self,
        segment: RouteSegment,
        hidden: torch.Tensor,
        prompts: torch.Tensor | None,
        mask: torch.Tensor | None,
        graph_keys: list[str] | None = None,
        graphs_kept: list[bool] | None = None,
    ) -> torch.Tensor:
        chunks = _row_chunks(hidden)
        keys = [str(uuid.uuid4()) for _ in chunks] if graph_keys is not None else [None] * len(chunks)
        if graph_keys is not None:
            graph_keys[:] = keys
        kept = [False] * len(chunks)

        async def chunk(index: int, rows: slice, key: str | None) -> torch.Tensor:
            args = [hidden[rows], _DUMMY if prompts is None else prompts[segment.start : segment.end, rows]]
            (out, *_), reply = await _call_with_reply_metadata(
                self.view,
                segment,
                "rpc_forward",
                args,
                None if mask is None else mask[rows],
                self.adapter,
                self.view.config.request_timeout,
                CallMetadata(keep_graph=key),
            )
            kept[index] = key is not None and reply.graph_kept
            return _expect(out, hidden[rows].shape, "hidden states").to(hidden.dtype)

        outs = await _gather_bounded(
            [chunk(i, rows, key) for i, (rows, key) in enumerate(zip(chunks, keys, strict=True))]
        )
        if graphs_kept is not None:
            graphs_kept[:] = kept
        return torch.cat(outs, dim=0)

    async def _segment_backward(
        self,
        segment: RouteSegment,
        inputs: torch.Tensor,
        grad_outputs: torch.Tensor,
        prompts: torch.Tensor | None,
        mask: torch.Tensor | None,
        graph_keys: list[str] | None = None,
        graphs_kept: list[bool] | None = None,
        grad_prefix: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients with respect to the segment's inputs (with `grad_prefix`, only the first positions'
        are asked for, the rest come back as zeros) and to its deep prompts."""
        chunks = _row_chunks(inputs)
        prefix = None if grad_prefix is None else int(grad_prefix)
        keys = graph_keys if graph_keys and len(graph_keys) == len(chunks) else [None] * len(chunks)
        kept = graphs_kept if graphs_kept and len(graphs_kept) == len(chunks) else [False] * len(chunks)

        async def chunk(rows: slice, key: str | None, kept: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            span_prompts = None if prompts is None else prompts[segment.start : segment.end, rows]
            args = [inputs[rows], grad_outputs[rows], _DUMMY if span_prompts is None else span_prompts]
            call = functools.partial(
                _call,
                self.view,
                segment,
                "rpc_backward",
                adapter=self.adapter,
                timeout=self.view.config.request_timeout,
            )
            grads = None
            if kept:
                # The server holds this chunk's forward graph, inputs and prompts: send only the
                # gradients (a third of the bytes). Should it have dropped the graph since, it says
                # so, and the full request follows.
                try:
                    grads = await call(
                        [_DUMMY, grad_outputs[rows], _DUMMY],
                        None,
                        extensions=CallMetadata(graph=key, grad_prefix=prefix),
                    )
                except P2PHandlerError as exc:
                    if protocol.ERR_GRAPH_GONE not in str(exc):
                        raise
            if grads is None:
                grads = await call(
                    args,
                    None if mask is None else mask[rows],
                    extensions=CallMetadata(graph=key, grad_prefix=prefix),
                )
            grad_inputs = _full_input_grads(grads[0], inputs[rows], grad_prefix)
            if span_prompts is None:
                return grad_inputs, None
            if len(grads) < 2:
                raise RemoteCallFailed("the server returned no prompt gradients")
            return grad_inputs, _expect(grads[1], span_prompts.shape, "prompt gradients").to(prompts.dtype)

        results = await _gather_bounded([chunk(rows, key, k) for rows, key, k in zip(chunks, keys, kept, strict=True)])
        grad_inputs = torch.cat([r[0] for r in results], dim=0)
        grad_prompts = None if prompts is None else torch.cat([r[1] for r in results], dim=1)
        return grad_inputs, grad_prompts

    # --- retries -------------------------------------------------------------------------------
    async def _route(self, start: int, end: int) -> list[RouteSegment]:
        await self.view.refresh_if_stale()
        return self.view.route(start, end, adapter=self.adapter)

    async def _failed(self, segment: RouteSegment, exc: BaseException, attempt: int) -> None:
        config = self.view.config
        if isinstance(exc, PrivacyCoverageError | PrivacyViolation):
            raise exc  # retrying cannot help: only a change of policy could
        if attempt > config.max_retries:
            if isinstance(exc, MissingBlocksError):
                raise exc
            raise RemoteCallFailed(f"blocks {segment.start}:{segment.end} failed after {attempt} attempts: {exc}")
        logger.warning(
            "server …%s failed (%s); re-routing blocks %d:%d", segment.peer_id[-6:], exc, segment.start, segment.end
        )
        if not isinstance(exc, MissingBlocksError):
            self.view.ban(segment.peer_id)
        if attempt > 1:
            await asyncio.sleep(min(config.min_backoff * 2 ** (attempt - 2), config.max_backoff))
        await self.view.refresh()

    async def forward(
        self,
        hidden: torch.Tensor,
        prompts: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        start: int = 0,
        end: int | None = None,
        keep_graphs: bool = False,
    ) -> tuple[torch.Tensor, list[Hop]]:
        """Outputs of blocks [start, end) and the hops taken (for `backward`). `keep_graphs`: a backward
        pass follows, so Corolla servers keep each forward graph for it."""
        end = self.view.num_blocks if end is None else end
        hops: list[Hop] = []
        position, attempt = start, 0
        while position < end:
            try:
                route = await self._route(position, end)
            except MissingBlocksError as exc:
                attempt += 1
                await self._failed(RouteSegment("?" * 6, position, end), exc, attempt)
                continue
            for segment in route:
                keys: list[str] = []
                kept: list[bool] = []
                try:
                    out = await self._segment_forward(
                        segment, hidden, prompts, mask, keys if keep_graphs else None, kept
                    )
                except Exception as exc:
                    attempt += 1
                    await self._failed(segment, exc, attempt)
                    break  # route again from this segment's first block
                self.view.on_success(segment.peer_id)
                hops.append(Hop(segment, hidden, keys, kept))
                hidden, position = out, segment.end
        if start == 0 and end == self.view.num_blocks:
            self.last_route = [hop.segment for hop in hops]
        return hidden, hops

    async def backward(
        self,
        hops: list[Hop],
        grad_outputs: torch.Tensor,
        prompts: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        grad_prefix: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients with respect to the first hop's inputs and to the deep prompts (if any). With
        `grad_prefix`, only the first that many positions' input gradients are needed: the first hop's
        server sends only those (prompt tuning: the positions after the prompts are frozen embeddings)."""
        grad_prompts = None if prompts is None else torch.zeros_like(prompts)
        for hop in reversed(hops):
            prefix = grad_prefix if hop is hops[0] else None
            grad_outputs, span_grads = await self._backward_range(hop, grad_outputs, prompts, mask, prefix)
            if grad_prompts is not None:
                grad_prompts[hop.segment.start : hop.segment.end] += span_grads
        return grad_outputs, grad_prompts

    async def _backward_range(
        self,
        hop: Hop,
        grad_outputs: torch.Tensor,
        prompts: torch.Tensor | None,
        mask: torch.Tensor | None,
        grad_prefix: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        segment = hop.segment
        try:
            grads = await self._segment_backward(
                segment, hop.inputs, grad_outputs, prompts, mask, hop.graph_keys, hop.graphs_kept, grad_prefix
            )
            self.view.on_success(segment.peer_id)
            return grads
        except Exception as exc:
            attempt, failing = 1, segment
            await self._failed(failing, exc, attempt)
        while True:
            # The failed server's blocks through a new route: forward again to get the inner inputs.
            try:
                _, inner = await self.forward(hop.inputs, prompts, mask, segment.start, segment.end, keep_graphs=True)
                grad_prompts = None if prompts is None else torch.zeros_like(prompts[segment.start : segment.end])
                grads = grad_outputs
                for inner_hop in reversed(inner):
                    failing = inner_hop.segment
                    grads, span_grads = await self._segment_backward(
                        failing, inner_hop.inputs, grads, prompts, mask, inner_hop.graph_keys, inner_hop.graphs_kept
                    )
                    self.view.on_success(failing.peer_id)
                    if grad_prompts is not None:
                        offset = failing.start - segment.start
                        grad_prompts[offset : offset + failing.end - failing.start] += span_grads
                return grads, grad_prompts
            except Exception as exc:
                attempt += 1
                await self._failed(failing, exc, attempt)


async def _gather_bounded(coroutines: list) -> list:
    in_flight = asyncio.Semaphore(CHUNKS_IN_FLIGHT)

    async def bounded(coroutine):
        async with in_flight:
            return await coroutine

    return await asyncio.gather(*(bounded(c) for c in coroutines))


def _row_chunks(hidden: torch.Tensor) -> list[slice]:
    batch, length = hidden.shape[0], max(hidden.shape[1], 1)
    rows = max(MAX_TOKENS_PER_REQUEST // length, 1)
    return [slice(i, min(i + rows, batch)) for i in range(0, batch, rows)] or [slice(0, 0)]
