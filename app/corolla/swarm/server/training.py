"""Forward and backward RPCs' work: what the handler's rpc_forward* / rpc_backward* methods run."""

from __future__ import annotations

import asyncio
import functools

# hivemind tells streaming RPCs apart by `typing.AsyncIterator` annotations (not collections.abc's).
from typing import Any, AsyncIterator  # noqa: UP035

import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from corolla.swarm import protocol
from corolla.swarm.models.span import BlockSpan
from corolla.swarm.server import block_args
from corolla.swarm.server.adapters import run_with_adapter
from corolla.swarm.server.compute_queue import Priority
from corolla.swarm.server.forward_graphs import KeptGraph
from corolla.swarm.server.packing import BadRequest, gather_stream, is_dummy, unpack_args_kwargs
from corolla.swarm.step_metadata import CallMetadata, ForwardReply

# Forward passes over more tokens than this run one block per compute job (see _forward_block_by_block).
PIECEWISE_MIN_TOKENS = 16


class TrainingMixin:
    """Forward and backward passes (rpc_forward / rpc_backward and their streamed forms): fine-tuning
    and scoring through the swarm. Long passes run one block per compute job so token steps are not
    stuck behind them; a Corolla client's forward may keep its graph for the backward that follows.

    Uses the handler's `limits`, `stats`, `graphs`, `adapters`, `max_request_bytes`, `_chain`,
    `_hidden_states` and `_compute`."""

    async def _forward(
        self, uid: str, metadata: CallMetadata, tensors: list[torch.Tensor], peer: PeerID | None = None
    ) -> tuple[torch.Tensor, bool]:
        """The outputs, and whether this forward's graph was kept for the backward that follows."""
        span = self._chain(uid)
        args, kwargs = unpack_args_kwargs(metadata.args_structure, tensors)
        if not args:
            raise BadRequest("forward needs hidden states")
        hidden = self._hidden_states(args[0])
        prompts = block_args.deep_prompts(args[1] if len(args) > 1 else None, span, hidden)
        mask = block_args.padding_mask(kwargs, hidden.shape[0], hidden.shape[1])
        adapter = block_args.check_adapter(metadata.active_adapter, self.adapters)
        self.stats.forward_requests += 1
        keep = metadata.keep_graph  # a Corolla client's backward will follow
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
        self, uid: str, metadata: CallMetadata, tensors: list[torch.Tensor], peer: PeerID | None = None
    ) -> list[torch.Tensor]:
        """[grad_inputs], plus grad_prompts when deep prompts were sent (Petals' reply). With a
        `grad_prefix` (a Corolla client whose first positions alone need gradients: prompt tuning),
        grad_inputs covers only that many first positions."""
        prefix = metadata.grad_prefix
        grads = await self._backward_grads(uid, metadata, tensors, peer)
        if prefix is not None and prefix < grads[0].shape[1]:
            grads[0] = grads[0][:, :prefix].contiguous()
        return grads

    async def _backward_grads(
        self, uid: str, metadata: CallMetadata, tensors: list[torch.Tensor], peer: PeerID | None
    ) -> list[torch.Tensor]:
        span = self._chain(uid)
        args, kwargs = unpack_args_kwargs(metadata.args_structure, tensors)
        if len(args) < 2:
            raise BadRequest("backward needs inputs and grad_outputs")
        key = metadata.graph
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
        adapter = block_args.check_adapter(metadata.active_adapter, self.adapters)
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
        return ForwardReply(graph_kept=kept).pack()

    async def _gather(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> tuple[str, CallMetadata, list]:
        try:
            async with asyncio.timeout(self.limits.request_timeout):
                uid, metadata, tensors = await gather_stream(
                    requests, max_bytes=self.max_request_bytes, max_messages=self.limits.max_stream_messages
                )
        except TimeoutError as exc:
            raise BadRequest(f"the request stream did not end within {self.limits.request_timeout} s") from exc
        self.stats.bytes_in += sum(t.numel() * t.element_size() for t in tensors)
        return uid, metadata, tensors
