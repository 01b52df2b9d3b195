"""How many bytes a loaded part of the model holds (weights, buffers, quantization state)."""

from __future__ import annotations

import torch
from torch import nn


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def module_nbytes(module: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer, plus bitsandbytes' per-weight quantization state."""
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) in seen or tensor.is_meta:
            continue
        seen.add(id(tensor))
        total += tensor_nbytes(tensor)
        quant_state = getattr(tensor, "quant_state", None)  # nf4: absmax and its own statistics
        if quant_state is not None:
            total += sum(tensor_nbytes(t) for t in _quant_state_tensors(quant_state))
        scb = getattr(tensor, "SCB", None)  # int8: per-row scales
        if isinstance(scb, torch.Tensor):
            total += tensor_nbytes(scb)
    return total


def _quant_state_tensors(state) -> list[torch.Tensor]:
    tensors = [getattr(state, name, None) for name in ("absmax", "code", "offset")]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += _quant_state_tensors(nested)
    return [t for t in tensors if isinstance(t, torch.Tensor)]
