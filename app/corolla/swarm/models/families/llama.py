"""Llama and its many fine-tunes."""

from corolla.swarm.models.family import ModelFamily, register


@register
class LlamaFamily(ModelFamily):
    name = "llama"
    model_types = ("llama",)

    def dht_prefix_from_repo(self, repo_id: str) -> str:
        # Petals: the model name only, dots made dashes, "-hf" appended unless already there.
        name = repo_id.rsplit("/", 1)[-1].replace(".", "-")
        return name if name.endswith("-hf") else f"{name}-hf"
