"""A loaded span of blocks [start, end) and the forward pass through it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig

from corolla.swarm.models.cache import SessionCache
from corolla.swarm.models.decode_graph import DecodeFastPath, GraphedDecoder
from corolla.swarm.models.errors import EngineError
from corolla.swarm.models.family import LayerCallContext, ModelFamily
from corolla.swarm.models.lean_decode import lean_decoder
from corolla.swarm.models.memory import module_nbytes
from corolla.swarm.models.static_cache import StaticSessionCache, static_cache_pays

# COROLLA_CUDA_GRAPHS=0 keeps CUDA decode steps eager (the static cache stays).
CUDA_GRAPHS_ENV = "COROLLA_CUDA_GRAPHS"


@dataclass
class BlockSpan:
    family: ModelFamily
    config: PretrainedConfig
    start: int
    end: int
    layers: nn.ModuleList
    rotary_emb: nn.Module | None
    device: torch.device
    dtype: torch.dtype
    quantization: str = "none"
    # Shared by this span and its sub-spans: the CUDA graphs' memory pool, and whether capture works.
    fast_path: DecodeFastPath = field(default_factory=DecodeFastPath)

    def __post_init__(self) -> None:
        types = self.family.layer_types(self.config)
        self.layer_types = types[self.start : self.end]
        self._span_layer_types = frozenset(self.layer_types)

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def memory_bytes(self) -> int:
        """Weights and buffers this span holds on its device."""
        modules = [self.layers] + ([self.rotary_emb] if self.rotary_emb is not None else [])
        return sum(module_nbytes(m) for m in modules)

    def static_cache_bytes(self, batch: int, max_length: int) -> int:
        """What a static cache of `batch` x `max_length` tokens allocates on this span."""
        width = self.family.cached_kv_dim(self.config)
        return 2 * batch * max_length * self.num_blocks * width * self.dtype.itemsize

    def new_cache(
        self,
        max_length: int | None = None,
        *,
        batch: int = 1,
        reserved_bytes: int | None = None,
        static: bool | None = None,
    ) -> SessionCache | StaticSessionCache:
        """A session's cache. Given its `max_length`, a static cache where one measured faster on this
        device type and its allocation fits `reserved_bytes` (the session's reservation), with CUDA
        graphs for its decode steps on a GPU; otherwise a dynamic one. `static` forces the choice."""
        if static is None:
            static = (
                max_length is not None
                and max_length > 0
                and static_cache_pays(self.device, max_length)
                and (reserved_bytes is None or self.static_cache_bytes(batch, max_length) <= reserved_bytes)
            )
        if not static:
            cache = SessionCache(self.config, self.start, self.end)
            cache.decoder = lean_decoder(self)  # token steps on the CPU, where the blocks allow
            return cache
        graphs = self.device.type == "cuda" and os.environ.get(CUDA_GRAPHS_ENV, "1") != "0"
        cache = StaticSessionCache(self.family, self.config, self.start, self.end, max_length, for_graphs=graphs)
        cache.decoder = GraphedDecoder(self, self.fast_path) if graphs else lean_decoder(self)
        return cache

    def sub(self, start: int, end: int) -> BlockSpan:
        """A view of blocks [start, end) of this span sharing its weights (a request may ask for fewer)."""
        if not self.start <= start < end <= self.end:
            raise EngineError(f"blocks [{start}, {end}) are not inside this span [{self.start}, {self.end})")
        if (start, end) == (self.start, self.end):
            return self
        layers = nn.ModuleList(list(self.layers)[start - self.start : end - self.start])
        return BlockSpan(
            self.family,
            self.config,
            start,
            end,
            layers,
            self.rotary_emb,
            self.device,
            self.dtype,
            self.quantization,
            self.fast_path,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: SessionCache | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        enable_grad: bool = False,
    ) -> torch.Tensor:
        """Run the span on `hidden_states` [batch, length, hidden], appending to `cache` if given.

        Without `position_ids`, positions continue from the cache length (what a Petals server does:
        the wire protocol carries neither masks nor positions). `attention_mask` is the 2D padding
        mask over past and new tokens. `enable_grad` keeps the autograd graph (for backward passes
        with respect to the inputs; the weights are frozen). `prompts` [num_blocks, batch or 1, P, hidden]
        are deep prompts: before block j, `prompts[j]` is added to the first P positions (Petals' rule).
        """
        with torch.enable_grad() if enable_grad else torch.inference_mode():
            return self._forward(hidden_states, cache, attention_mask, position_ids, prompts)

    def _forward(self, hidden_states, cache, attention_mask, position_ids, prompts=None) -> torch.Tensor:
        if cache is None:
            cache = SessionCache(self.config, self.start, self.end)
        past = cache.length
        self._validate(hidden_states, attention_mask, position_ids, past)
        length = hidden_states.shape[1]
        hidden = hidden_states.to(device=self.device, dtype=self.dtype)
        decoder = getattr(cache, "decoder", None)
        if (
            decoder is not None
            and attention_mask is None
            and position_ids is None
            and prompts is None
            and not torch.is_grad_enabled()
            and decoder.wants(cache, hidden)
        ):
            out = decoder.step(cache, hidden)
            if out is not None:
                return out
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=self.device).unsqueeze(0)
        else:
            position_ids = position_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        kwargs_by_type = self.family.layer_kwargs(
            LayerCallContext(
                config=self.config,
                rotary_emb=self.rotary_emb,
                hidden_states=hidden,
                cache=cache.cache,
                attention_mask=attention_mask,
                position_ids=position_ids,
                layer_types=self._span_layer_types,
            )
        )
        if prompts is not None:
            prompts = prompts.to(device=self.device, dtype=self.dtype)
        for index, (layer, layer_type) in enumerate(zip(self.layers, self.layer_types, strict=True)):
            if prompts is not None:
                width = prompts.shape[2]  # out of place: the inputs may be autograd leaves
                hidden = torch.cat([hidden[:, :width] + prompts[index], hidden[:, width:]], dim=1)
            out = layer(hidden, **kwargs_by_type[layer_type])
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    __call__ = forward

    def _validate(self, hidden, attention_mask, position_ids, past: int) -> None:
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3 or hidden.shape[-1] != self.hidden_size:
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise EngineError(f"hidden states must be [batch, length, {self.hidden_size}], got {shape}")
        if not hidden.is_floating_point():
            raise EngineError(f"hidden states must be floating point, got {hidden.dtype}")
        batch, length, _ = hidden.shape
        if length == 0 or batch == 0:
            raise EngineError("hidden states are empty")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + length):
            raise EngineError(
                f"attention mask must be [batch, past + length] = [{batch}, {past + length}], "
                f"got {tuple(attention_mask.shape)}"
            )
        if position_ids is not None and (
            position_ids.ndim != 2 or position_ids.shape[-1] != length or position_ids.shape[0] not in (1, batch)
        ):
            raise EngineError(f"position ids must be [batch, {length}], got {tuple(position_ids.shape)}")
