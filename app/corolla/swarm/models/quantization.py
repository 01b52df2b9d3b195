"""Quantize the linear layers of a span with bitsandbytes: int8 (LLM.int8) or nf4.

Fused MoE expert tensors (Mixtral in transformers 5) are parameters, not `nn.Linear`, and stay in
the compute dtype. Quantization happens as each new weight moves to the target device.
"""

from __future__ import annotations

import torch
from torch import nn

# LLM.int8's outlier threshold (as in Petals and bitsandbytes' docs).
INT8_OUTLIER_THRESHOLD = 6.0
NF4_BLOCKSIZE = 64


def quantize_linear_layers(
    module: nn.Module, quantization: str, device: torch.device, compute_dtype: torch.dtype
) -> int:
    """Replace every nn.Linear inside `module` (on the CPU) in place, then move the whole module to
    `device`, which quantizes the new weights; returns how many layers were replaced."""
    import bitsandbytes as bnb

    bnb_linears = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    replaced = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            # Subclasses count too (Falcon's FalconLinear); bitsandbytes' own layers are Linear subclasses.
            if not isinstance(child, nn.Linear) or isinstance(child, bnb_linears):
                continue
            weight = child.weight.data.to("cpu")
            has_bias = child.bias is not None
            if quantization == "int8":
                new = bnb.nn.Linear8bitLt(
                    child.in_features,
                    child.out_features,
                    bias=has_bias,
                    has_fp16_weights=False,
                    threshold=INT8_OUTLIER_THRESHOLD,
                )
                new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            elif quantization == "nf4":
                new = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=has_bias, compute_dtype=compute_dtype, quant_type="nf4"
                )
                new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCKSIZE)
            else:
                raise ValueError(f"unknown quantization {quantization!r}")
            if has_bias:
                new.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, child_name, new)
            replaced += 1
    module.to(device)
    return replaced
