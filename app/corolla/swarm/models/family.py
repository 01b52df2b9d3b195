"""What differs between architecture families, and the registry that maps `config.model_type` to one.

A family adapter never re-implements attention: it prepares the inputs that transformers' own decoder
layers expect (masks, rotary or alibi terms, the cache under the right keyword) and knows the
client-side stages (embeddings before the first block, final norm and head after the last one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from corolla.swarm.models.errors import EngineError, UnsupportedArchitectureError

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

# Block tensors in every supported checkpoint layout: `model.layers.3.`, `transformer.h.3.`, `h.3.`.
_BLOCK_TENSOR = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
# A DHT prefix ends up in uids `prefix.index`, joined by spaces in chained calls.
_FORBIDDEN_PREFIX_CHARS = re.compile(r"[.\s]")


def block_index_of(tensor_name: str) -> int | None:
    """The absolute block index a checkpoint tensor belongs to, or None for client-side tensors."""
    match = _BLOCK_TENSOR.search(tensor_name)
    return int(match.group(1)) if match else None


def validate_dht_prefix(prefix: str) -> str:
    if not prefix or _FORBIDDEN_PREFIX_CHARS.search(prefix):
        raise EngineError(f"DHT prefix {prefix!r} is invalid: it must be non-empty, without dots or spaces")
    return prefix


@dataclass
class LayerCallContext:
    """Everything a family needs to prepare the keyword arguments of one span forward."""

    config: PretrainedConfig
    rotary_emb: nn.Module | None
    hidden_states: torch.Tensor
    cache: Cache
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    layer_types: frozenset[str]
    # Fixed-shape steps (CUDA graphs): the masks per layer type over the whole static cache, built
    # from a device-side position; they replace the masks transformers would size from the cache.
    fixed_masks: dict[str, torch.Tensor] | None = None


class ModelFamily:
    """Rotary decoder-only transformers (the Llama shape). Other shapes override the hooks below."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    # The attribute of the base model (model.model / model.transformer) holding the decoder layers.
    layers_attr: ClassVar[str] = "layers"
    final_norm_attr: ClassVar[str] = "norm"
    # sdpa everywhere except where the family's attention needs eager (softcapping).
    attn_implementation: ClassVar[str] = "sdpa"

    # --- naming on the swarm -------------------------------------------------------------------
    def dht_prefix_from_repo(self, repo_id: str) -> str:
        """Families Petals does not know: the whole repo id with dots made dashes, the `/` kept.

        Keeping the owner avoids collisions between fine-tunes that share a model name.
        """
        return repo_id.replace(".", "-")

    # --- structure -----------------------------------------------------------------------------
    def layer_types(self, config: PretrainedConfig) -> list[str]:
        """Attention type per layer, by the same rule the models use."""
        declared = getattr(config, "layer_types", None)
        if declared is not None:
            return list(declared)
        kind = SLIDING_ATTENTION if getattr(config, "sliding_window", None) is not None else FULL_ATTENTION
        return [kind] * config.num_hidden_layers

    def kv_dim(self, config: PretrainedConfig) -> int:
        """Width of the keys (or values) one token stores per block: kv heads x head size."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return (getattr(config, "num_key_value_heads", None) or heads) * head_dim

    def cached_kv_dim(self, config: PretrainedConfig) -> int:
        """Width of the keys one token really stores per block in the cache (kv_dim, unless the
        layers widen the keys before caching them)."""
        return self.kv_dim(config)

    def base_model(self, model: nn.Module) -> nn.Module:
        return model.base_model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.base_model(model), self.layers_attr)

    def rotary_embedding(self, model: nn.Module) -> nn.Module | None:
        return getattr(self.base_model(model), "rotary_emb", None)

    # --- running blocks ------------------------------------------------------------------------
    def layer_kwargs(self, ctx: LayerCallContext) -> dict[str, dict[str, Any]]:
        """Keyword arguments for the decoder layers of a span, per attention type.

        Built once before the first layer runs: the masks read the cache length.
        """
        masks = self._masks(ctx, single_token_fast_path=True)
        out = {}
        for layer_type in ctx.layer_types:
            out[layer_type] = {
                "attention_mask": masks[layer_type],
                "position_embeddings": self.position_embeddings(ctx, layer_type),
                "position_ids": ctx.position_ids,
                "cache": ctx.cache,
                "use_cache": True,
            }
        return out

    def position_embeddings(self, ctx: LayerCallContext, layer_type: str) -> Any:
        return ctx.rotary_emb(ctx.hidden_states, ctx.position_ids)

    def _masks(
        self, ctx: LayerCallContext, single_token_fast_path: bool = False, **extra: Any
    ) -> dict[str, torch.Tensor | None]:
        if ctx.fixed_masks is not None:
            return ctx.fixed_masks
        # One new token without padding attends to every cached one: full attention needs no mask.
        # (The decode step of every swarm session; building the mask costs more than the attention.)
        unmasked = single_token_fast_path and ctx.attention_mask is None and ctx.hidden_states.shape[1] == 1
        mask_kwargs = {
            "config": ctx.config,
            "inputs_embeds": ctx.hidden_states,
            "attention_mask": ctx.attention_mask,
            "cache": ctx.cache,
            "position_ids": ctx.position_ids,
            **extra,
        }
        masks = {}
        for layer_type in ctx.layer_types:
            if layer_type == SLIDING_ATTENTION:
                masks[layer_type] = create_sliding_window_causal_mask(**mask_kwargs)
            elif unmasked:
                masks[layer_type] = None
            else:
                masks[layer_type] = create_causal_mask(**mask_kwargs)
        return masks

    # --- client-side stages --------------------------------------------------------------------
    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return model.get_input_embeddings()(input_ids)

    def head(self, model: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = getattr(self.base_model(model), self.final_norm_attr)(hidden_states)
        logits = model.lm_head(hidden_states)
        softcap = getattr(model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits


_REGISTRY: dict[str, ModelFamily] = {}


def register(family_class: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: make a family available for its `model_types`."""
    instance = family_class()
    for model_type in family_class.model_types:
        _REGISTRY[model_type] = instance
    return family_class


def supported_model_types() -> list[str]:
    _load_builtin_families()
    return sorted(_REGISTRY)


def family_for(model_type: str | None) -> ModelFamily:
    """The adapter for a `config.model_type`; an unsupported one fails with the supported list."""
    _load_builtin_families()
    family = _REGISTRY.get(model_type or "")
    if family is None:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported model types: "
            + ", ".join(supported_model_types())
        )
    return family


def _load_builtin_families() -> Iterable[str]:
    # Imported for their @register side effect; kept lazy so this module has no import cycle.
    from corolla.swarm.models import families  # noqa: F401

    return ()
