"""Trainable prompts for prompt tuning through the swarm (Petals' `tuning_mode`).

- "ptune": `pre_seq_len` embeddings prepended to the input embeddings on the client.
- "deep_ptune": also one prompt per block, sent to the servers as deep prompts and added to the
  first `pre_seq_len` positions before each block; zero at start, so training starts from the base model.
"""

from __future__ import annotations

import torch
from torch import nn


class PromptTuning(nn.Module):
    def __init__(self, hidden_size: int, num_blocks: int, pre_seq_len: int, deep: bool, init_std: float = 0.02):
        super().__init__()
        self.hidden_size, self.num_blocks, self.pre_seq_len, self.deep = hidden_size, num_blocks, pre_seq_len, deep
        self.prompt_embeddings = nn.Embedding(pre_seq_len, hidden_size)
        nn.init.normal_(self.prompt_embeddings.weight, std=init_std)
        self.intermediate_prompt_embeddings = nn.Embedding(pre_seq_len, num_blocks * hidden_size) if deep else None
        if self.intermediate_prompt_embeddings is not None:
            nn.init.zeros_(self.intermediate_prompt_embeddings.weight)

    def input_prompts(self, batch: int) -> torch.Tensor:
        """[batch, pre_seq_len, hidden]: prepended to the input embeddings."""
        return self.prompt_embeddings.weight.unsqueeze(0).expand(batch, -1, -1)

    def deep_prompts(self, batch: int) -> torch.Tensor:
        """[num_blocks, batch, pre_seq_len, hidden]: the servers add prompts[j] before block j."""
        weight = self.intermediate_prompt_embeddings.weight  # [P, num_blocks * hidden]
        per_block = weight.view(self.pre_seq_len, self.num_blocks, self.hidden_size).permute(1, 0, 2)
        return per_block.unsqueeze(1).expand(-1, batch, -1, -1)
