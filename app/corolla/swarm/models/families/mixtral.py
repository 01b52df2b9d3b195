"""Mixtral: Llama-shaped attention with a mixture-of-experts MLP (fused expert tensors in transformers 5)."""

from corolla.swarm.models.family import ModelFamily, register


@register
class MixtralFamily(ModelFamily):
    name = "mixtral"
    model_types = ("mixtral",)

    def dht_prefix_from_repo(self, repo_id: str) -> str:
        # Petals: the whole repo id, dots made dashes, the "/" kept.
        return repo_id.replace(".", "-")
