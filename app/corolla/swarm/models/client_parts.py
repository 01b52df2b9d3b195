"""The client-side parts of a model: what runs before the first block and after the last one."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from corolla.swarm.models.family import ModelFamily
from corolla.swarm.models.memory import module_nbytes


@dataclass
class ClientParts:
    """Embeddings (plus e.g. BLOOM's embedding layernorm), final norm, LM head; no decoder blocks.

    `model` is the family's CausalLM with an empty layer list, so `.to()` and the family's own
    embedding and head modules work unchanged.
    """

    family: ModelFamily
    model: nn.Module
    device: torch.device
    dtype: torch.dtype

    @property
    def config(self):
        return self.model.config

    def memory_bytes(self) -> int:
        return module_nbytes(self.model)

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, length] token ids -> [batch, length, hidden] inputs of block 0."""
        return self.family.embed(self.model, input_ids.to(self.device))

    @torch.inference_mode()
    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Outputs of the last block -> logits over the vocabulary."""
        return self.family.head(self.model, hidden_states.to(device=self.device, dtype=self.dtype))
