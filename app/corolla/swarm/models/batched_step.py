"""One forward for the token steps of several inference sessions on the same span.

A decode step reads every weight of its blocks whether it carries one row or sixteen, so the steps of
sessions that wait at the same time are run together. Each session keeps its own cache of its own
length; for the joint forward their caches are laid side by side, left-padded to the longest, with a
padding mask and per-row positions (the layout transformers uses for batched generation, so every
family's attention variant, rotary or ALiBi, handles it as it handles a padded batch). Afterwards
each session's cache takes only its own new keys and values, through the layer's own `update`, and
each session gets its own rows of the output. A session's result equals its result alone up to
floating-point summation order (greedy decoding stays token-exact; tests/test_batched_steps.py).

Sliding-window layers keep only their last `window - 1` positions. In the joint layout those are laid
right-aligned under a shared timeline of the longest session's length, so the window (a distance from
each query) and the padding mask cut exactly what each session alone would see.

Static (preallocated) caches join too, through their valid prefix; those captured for CUDA graphs
keep their own batch-1 fast path. Steps that cannot join a batch run alone, as before: deep prompts,
gradients, an empty cache, steps longer than a sliding window, and cache layers of other kinds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from corolla.swarm.models.cache import SessionCache
from corolla.swarm.models.span import BlockSpan
from corolla.swarm.models.static_cache import StaticKVLayer, StaticSessionCache

# The layer kinds whose state is exactly (keys, values[, cumulative length]): laid side by side safely.
_BATCHABLE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer, StaticKVLayer)


@dataclass
class StepRow:
    """One session's step: its cache, its new hidden states [batch, length, hidden], and optionally
    its padding mask [batch, past + length] and position ids [batch or 1, length]."""

    cache: SessionCache | StaticSessionCache
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def length(self) -> int:
        return int(self.hidden.shape[1])


def can_join(span: BlockSpan, cache: object, length: int) -> bool:
    """Whether a step of `length` new tokens on `cache` may run in a joint forward on `span`."""
    if type(cache) not in (SessionCache, StaticSessionCache) or (cache.start, cache.end) != (span.start, span.end):
        return False
    if cache.length == 0:
        return False
    if isinstance(cache, StaticSessionCache) and (
        cache.state.for_graphs or not cache.is_allocated or cache.length + length > cache.max_length
    ):
        return False
    for layer in cache.cache.layers[span.start : span.end]:
        if type(layer) not in _BATCHABLE_LAYERS or not layer.is_initialized:
            return False
        if getattr(layer, "record_past", False):
            return False
        window = getattr(layer, "sliding_window", None)
        if window is not None and length >= window:
            return False
    return True


def joint_cost_tokens(steps: list[StepRow]) -> int:
    """Cached positions the joint layout holds (what the padded copy costs), for the batch cap."""
    longest = max(step.cache.length for step in steps)
    return sum(step.rows for step in steps) * (longest + max(step.length for step in steps))


def padded_positions(steps: list[StepRow]) -> tuple[int, int]:
    """(positions a joint forward computes, positions the steps asked for): shorter steps are padded
    at their end to the longest step's length."""
    width = max(step.length for step in steps)
    return sum(step.rows for step in steps) * width, sum(step.rows * step.length for step in steps)


def forward_joined(span: BlockSpan, steps: list[StepRow]) -> list[torch.Tensor]:
    """Run every step in one forward on `span`; returns each step's output [rows, length, hidden].

    Every step passes `can_join` for its own length. Steps shorter than the longest (a one-token step
    beside a speculative draft) are padded at their end: a causal model's real positions never see
    later ones, so the padding changes nothing they compute, and only each step's own positions go
    back into its cache. Each step's cache gets its new tokens; if the forward fails, none changed."""
    width = max(step.length for step in steps)
    pasts = [step.cache.length for step in steps]
    longest = max(pasts)
    joint = SessionCache(span.config, span.start, span.end)
    for index in range(span.start, span.end):
        layers = [step.cache.cache.layers[index] for step in steps]
        keys, values = zip(*(_visible(layer) for layer in layers), strict=True)
        window = getattr(layers[0], "sliding_window", None)
        joint.cache.layers[index] = _JointLayer(list(keys), list(values), width, longest, window)
    hidden, masks, positions = [], [], []
    for step, past in zip(steps, pasts, strict=True):
        pad = width - step.length
        rows_hidden = step.hidden.to(device=span.device, dtype=span.dtype)
        hidden.append(torch.nn.functional.pad(rows_hidden, (0, 0, 0, pad)) if pad else rows_hidden)
        mask = torch.ones(step.rows, longest + width, dtype=torch.long)
        mask[:, : longest - past] = 0
        if step.attention_mask is not None:
            mask[:, longest - past : longest + step.length] = step.attention_mask.to(torch.long)
        masks.append(mask)
        if step.position_ids is not None:
            own = step.position_ids.to(torch.long).expand(step.rows, step.length)
            after = own[:, -1:] + torch.arange(1, pad + 1)  # the padding continues the positions
            positions.append(torch.cat([own, after], dim=1))
        else:
            positions.append(torch.arange(past, past + width).expand(step.rows, width))
    out = span(torch.cat(hidden), joint, attention_mask=torch.cat(masks), position_ids=torch.cat(positions))
    # Only now, with the forward done, does any session's cache change.
    results, first = [], 0
    for step in steps:
        rows = slice(first, first + step.rows)
        for index in range(span.start, span.end):
            layer = joint.cache.layers[index]
            new = slice(layer.stored - width, layer.stored - width + step.length)
            step.cache.cache.layers[index].update(layer.keys[rows, :, new], layer.values[rows, :, new])
        results.append(out[rows, : step.length])
        first += step.rows
    return results


def _visible(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values a layer's next step attends to: all it keeps (a dynamic layer), or the
    written prefix of a static buffer (of a sliding layer, its last window - 1 positions)."""
    if not isinstance(layer, StaticKVLayer):
        return layer.keys, layer.values
    start = 0 if layer.sliding_window is None else max(0, layer.length - layer.sliding_window + 1)
    return layer.keys[:, :, start : layer.length], layer.values[:, :, start : layer.length]


class _JointLayer(DynamicLayer):
    """One layer of the joint layout: every session's visible keys and values, right-aligned in one
    buffer with room for the step's new positions (written in place: no copy of the whole layout per
    step), reporting the mask sizes its sessions' own layers would report on the shared timeline."""

    def __init__(
        self, keys: list[torch.Tensor], values: list[torch.Tensor], room: int, timeline: int, window: int | None
    ):
        super().__init__()
        self.stored = max(k.shape[2] for k in keys)  # a sliding layer's: at most window - 1
        self.keys = _left_padded(keys, self.stored, room)
        self.values = _left_padded(values, self.stored, room)
        self.device, self.is_initialized = self.keys.device, True
        self.timeline, self.sliding_window, self.is_sliding = timeline, window, window is not None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.stored + key_states.shape[-2]
        self.keys[:, :, self.stored : end] = key_states
        self.values[:, :, self.stored : end] = value_states
        self.stored, self.timeline = end, self.timeline + key_states.shape[-2]
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.timeline

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.sliding_window is None:
            return self.timeline + query_length, 0
        offset = max(self.timeline - self.sliding_window + 1, 0)
        if self.timeline >= self.sliding_window:
            return self.sliding_window - 1 + query_length, offset
        return self.timeline + query_length, offset


def _left_padded(tensors: list[torch.Tensor], longest: int, room: int) -> torch.Tensor:
    """[rows_i, heads, length_i, dim] each -> [sum rows_i, heads, longest + room, dim]: real positions
    end at `longest`, `room` free positions follow."""
    rows = sum(t.shape[0] for t in tensors)
    sample = tensors[0]
    # Uninitialised but for the padding: masked positions must hold finite numbers (0 x NaN is NaN), and
    # zeroing the whole buffer cost a fifth of a 16-session SmolLM2 step on the CPU.
    joint = sample.new_empty(rows, sample.shape[1], longest + room, sample.shape[3])
    first = 0
    for tensor in tensors:
        rows_of = slice(first, first + tensor.shape[0])
        pad = longest - tensor.shape[2]
        if pad:
            joint[rows_of, :, :pad] = 0
        joint[rows_of, :, pad:longest] = tensor
        first += tensor.shape[0]
    return joint
