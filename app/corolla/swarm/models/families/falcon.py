"""Falcon: rotary (7B/40B/180B) or alibi variants; the layers take the cache as `layer_past`."""

import math
from typing import Any

import torch
from transformers.models.falcon.modeling_falcon import build_alibi_tensor

from corolla.swarm.models.family import FULL_ATTENTION, LayerCallContext, ModelFamily, register


@register
class FalconFamily(ModelFamily):
    name = "falcon"
    model_types = ("falcon",)
    layers_attr = "h"
    final_norm_attr = "ln_f"

    def dht_prefix_from_repo(self, repo_id: str) -> str:
        # Petals: the model name only, dots made dashes, no suffix.
        return repo_id.rsplit("/", 1)[-1].replace(".", "-")

    def kv_dim(self, config) -> int:
        head_dim = config.hidden_size // config.num_attention_heads
        if config.new_decoder_architecture:
            return config.num_kv_heads * head_dim
        return head_dim if config.multi_query else config.hidden_size

    def cached_kv_dim(self, config) -> int:
        # The new decoder architecture broadcasts its kv heads to every query head before caching.
        return config.hidden_size if config.new_decoder_architecture else self.kv_dim(config)

    def layer_types(self, config) -> list[str]:
        return [FULL_ATTENTION] * config.num_hidden_layers

    def layer_kwargs(self, ctx: LayerCallContext) -> dict[str, dict[str, Any]]:
        config, hidden = ctx.config, ctx.hidden_states
        batch, length, _ = hidden.shape
        alibi = None
        if config.alibi:
            mask = ctx.attention_mask
            if mask is None:  # every key the cache shows (the whole buffer in a fixed-shape step)
                kv_length = ctx.cache.get_mask_sizes(length, 0)[0]
                mask = torch.ones((batch, kv_length), device=hidden.device, dtype=torch.long)
            alibi = build_alibi_tensor(mask, config.num_attention_heads, dtype=hidden.dtype)
        # Alibi is added onto the mask, so it must always be materialised.
        causal_mask = self._masks(ctx, allow_is_causal_skip=False)[FULL_ATTENTION]
        if alibi is not None and causal_mask is not None and causal_mask.ndim == 4:
            min_value = torch.finfo(hidden.dtype).min
            if causal_mask.dtype == torch.bool:
                zero = torch.zeros((), device=causal_mask.device, dtype=hidden.dtype)
                causal_mask = torch.where(causal_mask, zero, min_value)
            head_dim = config.hidden_size // config.num_attention_heads
            alibi = alibi.reshape(batch, -1, *alibi.shape[1:])
            causal_mask = torch.masked_fill(alibi / math.sqrt(head_dim), causal_mask < -1, min_value)
        return {
            FULL_ATTENTION: {
                "layer_past": ctx.cache,
                "attention_mask": causal_mask,
                "position_ids": ctx.position_ids,
                "use_cache": True,
                "alibi": alibi,
                "position_embeddings": ctx.rotary_emb(hidden, position_ids=ctx.position_ids),
            }
        }
