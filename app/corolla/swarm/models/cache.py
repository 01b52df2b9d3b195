"""The KV cache of one inference session on one span of blocks.

A transformers `DynamicCache` built from the full config keeps absolute layer indices valid; the
layers outside the span become `DummyLayer`s, so the cache length and the mask sizes come from the
span's own layers (a plain per-span DynamicCache reads layer 0, empty on every span but the first).
"""

from __future__ import annotations

from transformers import PretrainedConfig
from transformers.cache_utils import DummyLayer, DynamicCache

from corolla.swarm.models.errors import CacheRollbackError
from corolla.swarm.models.memory import tensor_nbytes


class SessionCache:
    def __init__(self, config: PretrainedConfig, start: int, end: int):
        self.start, self.end = start, end
        self.decoder = None  # a lean_decode.LeanDecoder for token steps, once the span attaches one
        self.cache = DynamicCache(config=config)
        for index in range(len(self.cache.layers)):
            if not start <= index < end:
                self.cache.layers[index] = DummyLayer()

    @property
    def length(self) -> int:
        """Tokens processed so far (for sliding layers, including those that left the window)."""
        return self.cache.get_seq_length()

    def rollback(self, position: int) -> None:
        """Forget every token from `position` on, as Petals' `start_from_position` asks."""
        length = self.length
        if not 0 <= position <= length:
            raise CacheRollbackError(f"cannot roll back to position {position}: the cache holds {length} tokens")
        if position == length:
            return
        for layer in self.cache.layers[self.start : self.end]:
            window = getattr(layer, "sliding_window", None)
            if window is not None and length >= window:
                raise CacheRollbackError(
                    f"cannot roll back to position {position}: a sliding-window layer already dropped tokens "
                    "(replay the inputs into a new session instead)"
                )
        self.cache.crop(position - length)

    def nbytes(self) -> int:
        total = 0
        for layer in self.cache.layers[self.start : self.end]:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if tensor is not None:
                    total += tensor_nbytes(tensor)
        return total
