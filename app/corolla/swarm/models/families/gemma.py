"""Gemma 2 and Gemma 3 (text): alternating sliding and full layers, logit softcapping.

Gemma 2's attention softcapping is only implemented by the eager attention path. Gemma 3 has one
rotary embedding per layer type (local and global bases). The embedding scale lives inside the
model's own embedding module, so the default `embed` is right.
"""

from typing import Any

from corolla.swarm.models.family import LayerCallContext, ModelFamily, register


@register
class Gemma2Family(ModelFamily):
    name = "gemma2"
    model_types = ("gemma2",)
    attn_implementation = "eager"


@register
class Gemma3TextFamily(ModelFamily):
    name = "gemma3"
    model_types = ("gemma3_text",)

    def position_embeddings(self, ctx: LayerCallContext, layer_type: str) -> Any:
        return ctx.rotary_emb(ctx.hidden_states, ctx.position_ids, layer_type)
