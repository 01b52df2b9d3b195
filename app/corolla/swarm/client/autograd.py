"""Autograd through the swarm: the remote blocks as one differentiable function of (hidden, prompts)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from corolla.swarm.client.remote_forward import RemoteBlocks


class _RemoteBlocksFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, prompts, blocks, mask, run, grad_prefix, block_range):
        deep = prompts is not None and prompts.numel() > 0
        sent_prompts = prompts.detach().contiguous() if deep else None
        out, hops = run(blocks.forward(hidden.detach(), sent_prompts, mask, *block_range, keep_graphs=True))
        ctx.blocks, ctx.hops, ctx.mask, ctx.run, ctx.prompts = blocks, hops, mask, run, sent_prompts
        ctx.grad_prefix = grad_prefix
        return out

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_prompts = ctx.run(
            ctx.blocks.backward(ctx.hops, grad_output.contiguous(), ctx.prompts, ctx.mask, ctx.grad_prefix)
        )
        return grad_hidden, grad_prompts, None, None, None, None, None


def remote_blocks(
    blocks: RemoteBlocks,
    hidden: torch.Tensor,
    prompts: torch.Tensor | None,
    mask: torch.Tensor | None,
    run: Callable[[Any], Any],
    grad_prefix: int | None = None,
    block_range: tuple[int, int | None] = (0, None),
) -> torch.Tensor:
    """hidden [batch, length, hidden] through every remote block; differentiable with respect to
    `hidden` and the deep `prompts` [num_blocks, batch, P, hidden]. `run` runs a coroutine on the
    client's event loop. `grad_prefix`: only the first that many positions of `hidden` need gradients
    (the others' come back as zeros: give it only when nothing uses them). `block_range`: the remote
    blocks [start, end) (end None: the last block); the default is all of them."""
    differentiable = hidden.requires_grad or (prompts is not None and prompts.requires_grad)
    if not (torch.is_grad_enabled() and differentiable):  # no backward will follow: a plain forward
        plain = None if prompts is None else prompts.detach().contiguous()
        return run(blocks.forward(hidden.detach(), plain, mask, *block_range))[0]
    return _RemoteBlocksFunction.apply(hidden, prompts, blocks, mask, run, grad_prefix, block_range)
