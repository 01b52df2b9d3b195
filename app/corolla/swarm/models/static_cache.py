"""A KV cache preallocated to a session's max_length: the static cache.

Each span layer owns keys and values of `[batch, kv_heads, max_length, head_dim]`, allocated at the
session's first step (the shape comes from the layer itself) and written in place afterwards, so a
decode step copies one token instead of concatenating the whole past (what `DynamicCache` does).

Two ways to read it:
- eager (the default): `update` returns the valid prefix as a view (for sliding layers, the same
  window `DynamicSlidingWindowLayer` returns), so attention sees exactly the tensors, shapes and
  masks of the dynamic path and the results are bit for bit the same;
- fixed shape (`fixed_shape=True`, for CUDA graphs, decode_graph.py): `update` writes at the device
  position `position` and returns the whole buffer; masks built from `position` hide the rest. Shapes
  and addresses never change, so the step can be captured once and replayed per token.

Sliding-window layers keep every token (not a ring): the memory is reserved for max_length anyway
(Petals' accounting knows no windows), and so a rollback works at any depth, which the dynamic
sliding cache cannot do once the window has moved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, DummyLayer

from corolla.swarm.models.errors import CacheCapacityError, CacheRollbackError
from corolla.swarm.models.family import SLIDING_ATTENTION, ModelFamily
from corolla.swarm.models.memory import tensor_nbytes

# Where the static cache measured faster than the dynamic one (benchmarks/static_cache_cpu.py): on
# CUDA always (CUDA graphs need it); on the CPU only for sessions that may grow long. There, three
# runs on a loaded 2-core machine gave static/dynamic 0.89-0.99 at 2048 cached tokens (the dynamic
# cache copies its whole past every step), but 0.99-1.20 at 128, within that machine's noise and
# tilted against it. MPS: unmeasured, so dynamic.
STATIC_CACHE_MIN_MAX_LENGTH = {"cuda": 1, "cpu": 1024}


def static_cache_pays(device: torch.device, max_length: int) -> bool:
    minimum = STATIC_CACHE_MIN_MAX_LENGTH.get(device.type)
    return minimum is not None and max_length >= minimum


@dataclass
class StaticCacheState:
    """What a session's layers share with its cache and its fixed-shape steps. (Not the cache
    itself: no reference cycle, so a closed session's buffers are freed at once, not at the next
    garbage collection.)"""

    for_graphs: bool
    fixed_shape: bool = False
    position: torch.Tensor | None = None  # device scalar: the write position in fixed shape
    nbytes: int = 0


class StaticKVLayer(CacheLayerMixin):
    is_compileable = False  # transformers' mask helpers must treat it like a dynamic layer (eager view)
    is_croppable = True

    def __init__(self, max_length: int, sliding_window: int | None, state: StaticCacheState):
        super().__init__()
        self.max_length = max_length
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.length = 0
        self._state = state

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, key_dim = key_states.shape
        self.device = key_states.device
        # A fixed-shape step multiplies masked-out slots by 0, and 0 x NaN is NaN: zeros for graphs.
        # Eager views never read past the length, so they take uncommitted memory (pages fill as
        # tokens arrive). Ordinary tensors, not inference tensors: hypo_ids reorder them in place.
        alloc = torch.zeros if self._state.for_graphs else torch.empty
        with torch.inference_mode(False), torch.no_grad():
            self.keys = alloc((batch, heads, self.max_length, key_dim), dtype=key_states.dtype, device=self.device)
            self.values = alloc(
                (batch, value_states.shape[1], self.max_length, value_states.shape[-1]),
                dtype=value_states.dtype,
                device=self.device,
            )
        self.is_initialized = True
        self._state.nbytes += tensor_nbytes(self.keys) + tensor_nbytes(self.values)
        if self._state.position is None:
            self._state.position = torch.zeros((), dtype=torch.long, device=self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if key_states.shape[0] != self.keys.shape[0]:
            raise CacheCapacityError(
                f"this session's cache holds a batch of {self.keys.shape[0]}, the step has {key_states.shape[0]}"
            )
        if self._state.fixed_shape:
            slots = self._state.position + torch.arange(new, device=self.device)
            self.keys.index_copy_(2, slots, key_states)
            self.values.index_copy_(2, slots, value_states)
            return self.keys, self.values
        end = self.length + new
        if end > self.max_length:
            raise CacheCapacityError(
                f"the step's {new} tokens do not fit: the cache holds {self.length} of at most {self.max_length}"
            )
        self.keys[:, :, self.length : end].copy_(key_states)
        self.values[:, :, self.length : end].copy_(value_states)
        start = 0 if self.sliding_window is None else max(0, self.length - self.sliding_window + 1)
        self.length = end
        return self.keys[:, :, start:end], self.values[:, :, start:end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """What the dynamic layer of the same kind reports (or the whole buffer, in fixed shape)."""
        if self._state.fixed_shape:
            return self.max_length, 0
        if self.sliding_window is None:
            return self.length + query_length, 0
        window = self.sliding_window
        offset = max(self.length - window + 1, 0)
        if self.length >= window:
            return window - 1 + query_length, offset
        return self.length + query_length, offset

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_length

    def crop(self, tokens_to_remove: int) -> None:
        self.length -= abs(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized and self.length:
            index = beam_idx.to(self.device)
            with torch.no_grad():  # in place: a captured graph holds these addresses
                self.keys[:, :, : self.length] = self.keys[:, :, : self.length].index_select(0, index)
                self.values[:, :, : self.length] = self.values[:, :, : self.length].index_select(0, index)

    def reset(self) -> None:
        self.length = 0


class StaticSessionCache:
    """The static cache of one inference session on one span: the interface of `SessionCache`."""

    def __init__(
        self,
        family: ModelFamily,
        config: PretrainedConfig,
        start: int,
        end: int,
        max_length: int,
        *,
        for_graphs: bool = False,
    ):
        if not isinstance(max_length, int) or max_length <= 0:
            raise CacheCapacityError(f"a static cache needs a max_length > 0, got {max_length!r}")
        self.start, self.end, self.max_length = start, end, max_length
        self.state = StaticCacheState(for_graphs)
        self.decoder = None  # a decode_graph.GraphedDecoder, once the span attaches one
        types = family.layer_types(config)
        window = getattr(config, "sliding_window", None)
        layers: list = [DummyLayer() for _ in range(config.num_hidden_layers)]
        for index in range(start, end):
            sliding = types[index] == SLIDING_ATTENTION and window is not None
            layers[index] = StaticKVLayer(max_length, window if sliding else None, self.state)
        self.cache = Cache(layers=layers)
        self._span_layers: list[StaticKVLayer] = layers[start:end]

    @property
    def position(self) -> torch.Tensor | None:
        return self.state.position

    @property
    def length(self) -> int:
        return self._span_layers[0].length

    @property
    def batch_size(self) -> int | None:
        first = self._span_layers[0]
        return first.keys.shape[0] if first.is_initialized else None

    @property
    def is_allocated(self) -> bool:
        return all(layer.is_initialized for layer in self._span_layers)

    def advance(self, tokens: int) -> None:
        """Count `tokens` written by a fixed-shape step (which cannot touch Python state itself)."""
        for layer in self._span_layers:
            layer.length += tokens

    def rollback(self, position: int) -> None:
        """Forget every token from `position` on (any depth: no layer ever drops a token)."""
        length = self.length
        if not 0 <= position <= length:
            raise CacheRollbackError(f"cannot roll back to position {position}: the cache holds {length} tokens")
        for layer in self._span_layers:
            layer.length = position

    def nbytes(self) -> int:
        """Bytes allocated (the whole max_length, once the first step has run)."""
        return self.state.nbytes
