"""One module per architecture family; importing this package registers them all.

- llama.py: Llama (Petals' naming rule)          - mixtral.py: Mixtral (Petals' naming rule)
- falcon.py: Falcon, rotary or alibi (Petals')   - bloom.py: BLOOM, alibi (Petals' naming rule)
- mistral.py, qwen.py, gemma.py, phi3.py: families Petals never served; they use the default
  naming rule of `ModelFamily.dht_prefix_from_repo` (the whole repo id, dots made dashes).
"""

from corolla.swarm.models.families import bloom, falcon, gemma, llama, mistral, mixtral, phi3, qwen

__all__ = ["bloom", "falcon", "gemma", "llama", "mistral", "mixtral", "phi3", "qwen"]
