"""Mistral: Llama-shaped, optionally with a sliding window on every layer."""

from corolla.swarm.models.family import ModelFamily, register


@register
class MistralFamily(ModelFamily):
    name = "mistral"
    model_types = ("mistral",)
