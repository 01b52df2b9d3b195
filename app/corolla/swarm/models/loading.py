"""Load blocks [start, end) alone, or the client-side parts alone, never materialising the rest.

The model skeleton is built on the meta device (buffers such as rotary frequencies stay real); the
tensors of the needed part are read from the shards that hold them and loaded through transformers'
own checkpoint conversion (legacy names, fused MoE experts); then only that part is kept.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass

import torch
from torch import nn

from corolla.swarm.models.checkpoint import Checkpoint, open_checkpoint
from corolla.swarm.models.client_parts import ClientParts
from corolla.swarm.models.devices import (
    check_quantization_supported,
    checkpoint_dtype_of,
    resolve_device,
    resolve_dtype,
)
from corolla.swarm.models.errors import BlockRangeError, CheckpointError, EngineError
from corolla.swarm.models.quantization import quantize_linear_layers
from corolla.swarm.models.span import BlockSpan


@dataclass(frozen=True)
class LoadOptions:
    device: str | torch.device = "auto"
    dtype: str | torch.dtype = "auto"
    quantization: str = "none"  # none | int8 | nf4 (spans only)
    token: str | None = None
    revision: str | None = None
    cache_dir: str | None = None
    endpoint: str | None = None  # hub mirror


# accelerate's init_empty_weights patches nn.Module.register_parameter for the whole process while it
# is active, so a parameter created by another thread at that moment would land on the meta device.
# Every skeleton build and every load holds this lock.
_MODULE_CREATION_LOCK = threading.RLock()


def _serialised(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _MODULE_CREATION_LOCK:
            return function(*args, **kwargs)

    return wrapper


def _as_checkpoint(source: Checkpoint | str | os.PathLike, options: LoadOptions) -> Checkpoint:
    if isinstance(source, Checkpoint):
        return source
    return open_checkpoint(
        source, token=options.token, revision=options.revision, cache_dir=options.cache_dir, endpoint=options.endpoint
    )


@_serialised
def build_skeleton(checkpoint: Checkpoint, dtype: torch.dtype) -> nn.Module:
    """The whole CausalLM with parameters on the meta device: costs no memory, takes no time."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(
            checkpoint.config,
            dtype=dtype,
            attn_implementation=checkpoint.family.attn_implementation,
            trust_remote_code=False,
        )
    return model.eval()


def _load_tensors_into(
    model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device, source: str
) -> None:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.utils import logging as hf_logging

    config = LoadStateDictConfig(
        dtype=dtype, device_map={"": str(device)}, weight_mapping=get_model_conversion_mapping(model)
    )
    hf_logging.disable_progress_bar()
    info, _ = convert_and_load_state_dict_in_model(model, tensors, config)
    if info.mismatched_keys:
        name, got, expected = sorted(info.mismatched_keys)[0]
        raise CheckpointError(
            f"{source}: tensor {name} has shape {tuple(got)} but the config implies {tuple(expected)} "
            f"({len(info.mismatched_keys)} mismatched)"
        )
    if info.conversion_errors:
        raise CheckpointError(f"{source}: could not convert checkpoint tensors: {info.conversion_errors}")
    if info.unexpected_keys:
        raise CheckpointError(f"{source}: tensors the model does not have: {sorted(info.unexpected_keys)[:5]}")


def _assert_materialised(module: nn.Module, what: str) -> None:
    left = [name for name, p in module.named_parameters() if p.is_meta]
    left += [name for name, b in module.named_buffers() if b.is_meta]
    if left:
        raise CheckpointError(f"{what}: the checkpoint lacks {len(left)} tensor(s), e.g. {left[:3]}")


@_serialised
def load_span(
    source: Checkpoint | str | os.PathLike, start: int, end: int, options: LoadOptions | None = None
) -> BlockSpan:
    """Load blocks [start, end) of a model, reading only the shards that hold their tensors."""
    options = options or LoadOptions()
    checkpoint = _as_checkpoint(source, options)
    total = checkpoint.num_blocks
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= total):
        raise BlockRangeError(f"blocks [{start}, {end}) are outside the model, which has blocks [0, {total})")
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device, checkpoint_dtype_of(checkpoint.config))
    check_quantization_supported(options.quantization, device)

    names = checkpoint.block_tensor_names(start, end)
    if not names:
        raise CheckpointError(f"{checkpoint.source_name} has no tensors for blocks [{start}, {end})")
    model = build_skeleton(checkpoint, dtype)
    family = checkpoint.family
    # Quantization reads full-precision weights from the CPU and quantizes as they move to the device.
    load_device = torch.device("cpu") if options.quantization != "none" else device
    _load_tensors_into(model, checkpoint.read_tensors(names), dtype, load_device, checkpoint.source_name)

    layers = nn.ModuleList(list(family.decoder_layers(model))[start:end]).requires_grad_(False)
    _assert_materialised(layers, f"blocks [{start}, {end}) of {checkpoint.source_name}")
    if options.quantization != "none":
        quantize_linear_layers(layers, options.quantization, device, dtype)
    rotary = family.rotary_embedding(model)
    if rotary is not None:
        rotary = rotary.to(device)
    return BlockSpan(
        family=family,
        config=checkpoint.config,
        start=start,
        end=end,
        layers=layers.eval(),
        rotary_emb=rotary,
        device=device,
        dtype=dtype,
        quantization=options.quantization,
    )


@_serialised
def load_client_parts(source: Checkpoint | str | os.PathLike, options: LoadOptions | None = None) -> ClientParts:
    """Load embeddings, final norm and head (and whatever else is not a block)."""
    options = options or LoadOptions()
    if options.quantization != "none":
        raise EngineError("the client parts are not quantized; load them with quantization='none'")
    checkpoint = _as_checkpoint(source, options)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device, checkpoint_dtype_of(checkpoint.config))
    model = build_skeleton(checkpoint, dtype)
    family = checkpoint.family
    setattr(family.base_model(model), family.layers_attr, nn.ModuleList())
    _load_tensors_into(
        model, checkpoint.read_tensors(checkpoint.client_tensor_names()), dtype, device, checkpoint.source_name
    )
    if getattr(checkpoint.config, "tie_word_embeddings", False):
        model.tie_weights()
    _assert_materialised(model, f"client parts of {checkpoint.source_name}")
    return ClientParts(family=family, model=model.to(device), device=device, dtype=dtype)


@dataclass(frozen=True)
class MemoryEstimate:
    per_block_bytes: list[int]
    client_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(self.per_block_bytes) + self.client_bytes


@_serialised
def estimate_memory(checkpoint: Checkpoint, dtype: torch.dtype, quantization: str = "none") -> MemoryEstimate:
    """Weight bytes of each block and of the client parts, from the meta skeleton: nothing is loaded.

    Quantized linear weights take 1 byte (int8) or 0.5 byte plus one fp32 scale per 64 (nf4) per value.
    """
    model = build_skeleton(checkpoint, dtype)
    family = checkpoint.family
    element = torch.empty((), dtype=dtype).element_size()
    per_block = []
    for layer in family.decoder_layers(model):
        total = 0
        for module in layer.modules():
            for name, param in module.named_parameters(recurse=False):
                is_linear_weight = isinstance(module, nn.Linear) and name == "weight"
                if quantization == "int8" and is_linear_weight:
                    total += param.numel() + 4 * param.shape[0]
                elif quantization == "nf4" and is_linear_weight:
                    total += param.numel() // 2 + 4 * (param.numel() // 64)
                else:
                    total += param.numel() * element
        per_block.append(total)
    block_params = {id(p) for layer in family.decoder_layers(model) for p in layer.parameters()}
    client = sum(p.numel() * element for p in model.parameters() if id(p) not in block_params)
    return MemoryEstimate(per_block_bytes=per_block, client_bytes=client)
