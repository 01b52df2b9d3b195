"""Local edge blocks: the client runs the model's first k and last k blocks itself.

With k > 0 no server receives token embeddings (the first server gets the states leaving block k - 1)
and no server computes the model's final states (the last server returns the states entering block
L - k), so the two simplest readings of a chat (a nearest-neighbour lookup in the public embeddings, the
public head on the last output) no longer apply as such. It is not a privacy guarantee: on SmolLM2 the
first server still recovers 76-95% of the words at k = 1..4 (benchmarks/privacy.py, README "Who can read
my chat"); only routing to trusted servers keeps text away from a server. Its price is the client
running 2k blocks per token and holding their weights (benchmarks/local_edges.py).

The remote route covers [k, L - k); these caches follow the remote session's positions step by step
(rollback, beam reordering, padding masks and deep prompts as a server applies them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from corolla.swarm.models import LoadOptions
from corolla.swarm.models.cache import SessionCache
from corolla.swarm.models.loading import load_span
from corolla.swarm.models.span import BlockSpan


class LocalEdgesError(ValueError):
    """An edge size the model cannot take (negative, or leaving no block for the swarm)."""


def check_edge_blocks(k: object, num_blocks: int) -> int:
    """`k` as an int in [0, (num_blocks - 1) // 2]: at least one block must stay with the swarm."""
    if type(k) is not int or k < 0:
        raise LocalEdgesError(f"local_edge_blocks must be a whole number >= 0, got {k!r}")
    most = (num_blocks - 1) // 2
    if k > most:
        raise LocalEdgesError(
            f"local_edge_blocks={k} would run {2 * k} of the model's {num_blocks} blocks on this computer; "
            f"at most {most} at each end leaves the swarm at least one block"
        )
    return k


def _positions(mask: torch.Tensor | None, past: int, length: int) -> torch.Tensor | None:
    """Position ids of the new tokens under a padding mask, as a server derives them (None: no padding)."""
    if mask is None:
        return None
    full = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return full[:, past : past + length]


@dataclass
class LocalEdges:
    """The loaded edge spans of one model: `head` = blocks [0, k), `tail` = blocks [L - k, L)."""

    head: BlockSpan
    tail: BlockSpan
    num_blocks: int

    @classmethod
    def load(cls, checkpoint, k: int, options: LoadOptions) -> LocalEdges:
        total = checkpoint.num_blocks
        check_edge_blocks(k, total)
        if k == 0:
            raise LocalEdgesError("local_edge_blocks=0 loads nothing: leave the edges to the swarm")
        return cls(load_span(checkpoint, 0, k, options), load_span(checkpoint, total - k, total, options), total)

    @property
    def k(self) -> int:
        return self.head.num_blocks

    @property
    def remote_range(self) -> tuple[int, int]:
        """The blocks the swarm runs: [k, L - k)."""
        return self.k, self.num_blocks - self.k

    def memory_bytes(self) -> int:
        return self.head.memory_bytes() + self.tail.memory_bytes()

    def describe(self) -> str:
        last = self.num_blocks - 1
        return f"blocks 0–{self.k - 1} and {last - self.k + 1}–{last} ran on this computer"

    def run(
        self,
        span: BlockSpan,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        prompts: torch.Tensor | None,
        enable_grad: bool,
    ) -> torch.Tensor:
        """A stateless pass through one edge span (training and scoring: `forward()` without a cache);
        differentiable with respect to `hidden` and `prompts` when `enable_grad`."""
        out = span(
            hidden.to(span.dtype),
            attention_mask=mask,
            position_ids=_positions(mask, 0, hidden.shape[1]),
            prompts=None if prompts is None else prompts[span.start : span.end],
            enable_grad=enable_grad,
        )
        return out.to(hidden.dtype)

    def session(self) -> EdgeCaches:
        return EdgeCaches(self)


class EdgeCaches:
    """One inference session's caches on the two edge spans, kept at the remote session's position."""

    def __init__(self, edges: LocalEdges):
        self.edges = edges
        self.head = SessionCache(edges.head.config, edges.head.start, edges.head.end)
        self.tail = SessionCache(edges.tail.config, edges.tail.start, edges.tail.end)

    @property
    def position(self) -> int:
        return self.head.length

    def _step(
        self,
        span: BlockSpan,
        cache: SessionCache,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        prompts: torch.Tensor | None,
    ) -> torch.Tensor:
        past, length = cache.length, hidden.shape[1]
        return span(
            hidden.to(span.dtype),
            cache,
            attention_mask=mask,
            position_ids=_positions(mask, past, length),
            prompts=None if prompts is None or past else prompts[span.start : span.end],
        ).to(hidden.dtype)

    def before(
        self,
        hidden: torch.Tensor,
        *,
        hypo_ids: torch.Tensor | None,
        mask: torch.Tensor | None,
        prompts: torch.Tensor | None,
    ) -> torch.Tensor:
        """Blocks [0, k) on a step's inputs (after reordering both caches' rows for beam search)."""
        if hypo_ids is not None:
            for cache in (self.head, self.tail):
                if cache.length:
                    cache.cache.reorder_cache(hypo_ids.to(self.edges.head.device))
        return self._step(self.edges.head, self.head, hidden, mask, prompts)

    def after(self, hidden: torch.Tensor, *, mask: torch.Tensor | None, prompts: torch.Tensor | None) -> torch.Tensor:
        """Blocks [L - k, L) on what the swarm returned."""
        return self._step(self.edges.tail, self.tail, hidden, mask, prompts)

    def rollback(self, position: int) -> None:
        """Forget every token from `position` on (both caches; a cache already shorter stays as it is)."""
        for cache in (self.head, self.tail):
            if position < cache.length:
                cache.rollback(position)
