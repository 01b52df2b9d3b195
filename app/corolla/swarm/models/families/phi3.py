"""Phi-3: fused qkv and gate/up projections inside transformers' own layer; optional sliding window."""

from corolla.swarm.models.family import ModelFamily, register


@register
class Phi3Family(ModelFamily):
    name = "phi3"
    model_types = ("phi3",)
