"""BLOOM: alibi positions, an extra layernorm after the word embeddings, `layer_past` cache keyword."""

from typing import Any

import torch
from torch import nn
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor

from corolla.swarm.models.family import FULL_ATTENTION, LayerCallContext, ModelFamily, register


@register
class BloomFamily(ModelFamily):
    name = "bloom"
    model_types = ("bloom",)
    layers_attr = "h"
    final_norm_attr = "ln_f"
    attn_implementation = "eager"  # transformers has no sdpa path for BLOOM

    def dht_prefix_from_repo(self, repo_id: str) -> str:
        # Petals: the whole repo id plus "-petals", dots made dashes, the "/" kept.
        return f"{repo_id}-petals".replace(".", "-")

    def layer_types(self, config) -> list[str]:
        return [FULL_ATTENTION] * config.num_hidden_layers

    def layer_kwargs(self, ctx: LayerCallContext) -> dict[str, dict[str, Any]]:
        config, hidden = ctx.config, ctx.hidden_states
        batch, length, _ = hidden.shape
        heads = config.n_head
        if ctx.attention_mask is None:
            # Without padding alibi depends only on the key length (softmax is shift-invariant).
            kv_length = ctx.cache.get_mask_sizes(length, 0)[0]
            slopes = _get_alibi_slopes(heads, hidden.device)
            alibi = slopes[:, None, None] * torch.arange(kv_length, device=hidden.device)
            alibi = alibi.repeat(batch, 1, 1).to(hidden.dtype)
        else:
            alibi = build_alibi_tensor(ctx.attention_mask.to(hidden.device), heads, dtype=hidden.dtype)
        return {
            FULL_ATTENTION: {
                "layer_past": ctx.cache,
                # BloomModel builds its mask without position ids; do the same.
                "attention_mask": self._masks(ctx, position_ids=None)[FULL_ATTENTION],
                "use_cache": True,
                "alibi": alibi,
            }
        }

    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        base = self.base_model(model)
        return base.word_embeddings_layernorm(base.word_embeddings(input_ids))
