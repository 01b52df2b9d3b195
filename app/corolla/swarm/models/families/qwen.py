"""Qwen2 and Qwen3: Llama-shaped, with per-layer full or sliding attention from `layer_types`."""

from corolla.swarm.models.family import ModelFamily, register


@register
class QwenFamily(ModelFamily):
    name = "qwen"
    model_types = ("qwen2", "qwen3")
