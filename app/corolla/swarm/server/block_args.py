"""The optional inputs of forward, backward and inference requests: deep prompts, the padding mask,
the adapter; checked against the request before any compute, and the backward pass that uses them.

- Deep prompts (Petals' `prompts` argument): [num_blocks, batch or 1, P, hidden], P at most the
  request's length; before block j, prompts[j] is added to the first P positions.
- The padding mask (a Corolla extension, the `attention_mask` keyword of `args_structure`, which stock
  servers ignore): [batch, past + length] of 0/1 over every position the blocks attend to. Positions
  then follow the mask, as transformers' `generate()` derives them (cumsum - 1, 0 on padding).
"""

from __future__ import annotations

from typing import Any

import torch

from corolla.swarm import protocol
from corolla.swarm.models.span import BlockSpan
from corolla.swarm.server.packing import BadRequest, is_dummy


def deep_prompts(value: Any, span: BlockSpan, hidden: torch.Tensor) -> torch.Tensor | None:
    """The request's deep prompts, checked against the span and the hidden states; None if absent."""
    if is_dummy(value):
        return None
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise BadRequest("prompts must be a floating tensor [num_blocks, batch or 1, prefix, hidden]")
    batch, length, hidden_size = hidden.shape
    if value.ndim != 4:
        raise BadRequest(f"prompts must be [num_blocks, batch or 1, prefix, hidden], got shape {tuple(value.shape)}")
    blocks, rows, width, size = value.shape
    if blocks != span.num_blocks:
        raise BadRequest(f"prompts are for {blocks} blocks, the request names {span.num_blocks}")
    if rows not in (1, batch):
        raise BadRequest(f"prompts have {rows} rows for a batch of {batch}")
    if size != hidden_size:
        raise BadRequest(f"prompts have hidden size {size}, this model's is {hidden_size}")
    if not 0 < width <= length:
        raise BadRequest(f"prompts cover {width} positions, the request has {length}")
    return value


def padding_mask(kwargs: dict, batch: int, total_length: int) -> torch.Tensor | None:
    """The request's padding mask over past and new positions; None if absent (no padding)."""
    value = kwargs.get("attention_mask")
    if is_dummy(value):
        return None
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.is_floating_point():
        raise BadRequest("attention_mask must be an integer tensor [batch, past + length]")
    if tuple(value.shape) != (batch, total_length):
        raise BadRequest(
            f"attention_mask must be [batch, past + length] = [{batch}, {total_length}], got {tuple(value.shape)}"
        )
    if bool(((value != 0) & (value != 1)).any()):
        raise BadRequest("attention_mask must hold only 0 and 1")
    return value.to(torch.long)


def positions(mask: torch.Tensor | None, past: int, length: int) -> torch.Tensor | None:
    """Position ids of the new tokens under a padding mask (None: positions follow the cache length)."""
    if mask is None:
        return None
    full = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return full[:, past : past + length]


def check_adapter(name: str | None, available: tuple[str, ...]) -> str | None:
    """The adapter a request asks for (its decoded `active_adapter`): None for the base model; refused
    if this server lacks it."""
    if name is None:
        return None
    if name not in available:
        raise BadRequest(f"adapter {protocol.shorten(name)} not found")
    return name


def forward(
    span: BlockSpan, hidden: torch.Tensor, prompts: torch.Tensor | None, mask: torch.Tensor | None
) -> torch.Tensor:
    return span(hidden, attention_mask=mask, position_ids=positions(mask, 0, hidden.shape[1]), prompts=prompts)


def one_block_each(span: BlockSpan, prompts: torch.Tensor | None) -> list[tuple[BlockSpan, torch.Tensor | None]]:
    """The span as one-block spans in order, each with its block's deep prompts."""
    return [
        (span.sub(block, block + 1), None if prompts is None else prompts[i : i + 1])
        for i, block in enumerate(range(span.start, span.end))
    ]


def backward(
    span: BlockSpan,
    inputs: torch.Tensor,
    grad_outputs: torch.Tensor,
    prompts: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> list[torch.Tensor]:
    """Gradients with respect to the inputs (and the deep prompts, if sent); the weights stay frozen."""
    _, leaf, prompt_leaf, out = forward_keeping_graph(span, inputs, prompts, mask)
    return backward_through(out, leaf, prompt_leaf, grad_outputs)


def _grad_leaves(
    span: BlockSpan, inputs: torch.Tensor, prompts: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    leaf = inputs.detach().to(device=span.device, dtype=span.dtype).requires_grad_(True)
    if prompts is None:
        return leaf, None
    # Petals returns per-row prompt gradients [num_blocks, batch, P, hidden] even for shared prompts.
    rows = prompts.expand(prompts.shape[0], inputs.shape[0], *prompts.shape[2:])
    return leaf, rows.detach().to(device=span.device, dtype=span.dtype).contiguous().requires_grad_(True)


def forward_keeping_graph(
    span: BlockSpan, hidden: torch.Tensor, prompts: torch.Tensor | None, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A forward pass whose autograd graph is kept: (outputs, input leaf, prompt leaf, graph outputs)."""
    leaf, prompt_leaf = _grad_leaves(span, hidden, prompts)
    out = span(
        leaf,
        attention_mask=mask,
        position_ids=positions(mask, 0, hidden.shape[1]),
        prompts=prompt_leaf,
        enable_grad=True,
    )
    return out.detach(), leaf, prompt_leaf, out


def graph_nbytes(span: BlockSpan, hidden: torch.Tensor) -> int:
    """A generous estimate of the activations a kept forward graph holds."""
    config = span.config
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * span.hidden_size)
    per_token_block = 12 * span.hidden_size + 4 * intermediate
    item = torch.finfo(span.dtype).bits // 8
    return hidden.shape[0] * hidden.shape[1] * span.num_blocks * per_token_block * item


def backward_through(
    out: torch.Tensor, leaf: torch.Tensor, prompt_leaf: torch.Tensor | None, grad_outputs: torch.Tensor
) -> list[torch.Tensor]:
    """Gradients through a kept forward graph (no re-run)."""
    targets = [leaf] if prompt_leaf is None else [leaf, prompt_leaf]
    return list(torch.autograd.grad(out, targets, grad_outputs.to(device=out.device, dtype=out.dtype)))
