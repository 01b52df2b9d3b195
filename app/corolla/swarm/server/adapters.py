"""LoRA adapters a server can activate per request (`corolla serve --adapters PATH...`).

An adapter is a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors). Only the tensors
of this server's blocks are loaded; each targeted nn.Linear of the span is wrapped once in a
`LoraLinear` holding every adapter's (A, B, scaling); the adapter a request names is active only on
the compute thread, only while that request's job runs (a thread-local), so requests with and
without adapters share one copy of the base weights. No pickle: safetensors and JSON only.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file
from torch import nn

from corolla.swarm.models.errors import EngineError
from corolla.swarm.models.span import BlockSpan

T = TypeVar("T")
_LORA_KEY = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
_active = threading.local()
MAX_RANK = 1024


class AdapterError(EngineError):
    """An adapter folder that cannot be served (missing files, unsupported options, wrong shapes)."""


class LoraLinear(nn.Module):
    """A frozen linear layer plus low-rank updates, of which at most one is active at a time."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    @property
    def weight(self) -> torch.Tensor:  # code that inspects the layer (dtype, device) sees the base's
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        update = self.lora.get(getattr(_active, "name", None))
        if update is not None:
            a, b, scaling = update
            out = out + (x.to(a.dtype) @ a.T @ b.T * scaling).to(out.dtype)
        return out


@contextlib.contextmanager
def active_adapter(name: str | None) -> Iterator[None]:
    previous = getattr(_active, "name", None)
    _active.name = name
    try:
        yield
    finally:
        _active.name = previous


def run_with_adapter(name: str | None, fn: Callable[[], T]) -> Callable[[], T]:
    """`fn` wrapped so that `name` is the active adapter while it runs (on whatever thread)."""
    if name is None:
        return fn

    def wrapped() -> T:
        with active_adapter(name):
            return fn()

    return wrapped


def check_adapter_folders(folders: list[str]) -> None:
    """Fail before joining the swarm if an adapter folder cannot be served."""
    for folder in folders:
        _read_config(Path(folder))


def _read_config(folder: Path) -> tuple[float, list[str]]:
    config_path = folder / "adapter_config.json"
    if not config_path.is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise AdapterError(f"{folder} needs adapter_config.json and adapter_model.safetensors (a PEFT LoRA adapter)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{folder}: only LoRA adapters are supported, not {config.get('peft_type')}")
    if config.get("fan_in_fan_out") or config.get("use_dora"):
        raise AdapterError(f"{folder}: fan_in_fan_out and DoRA adapters are not supported")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if type(rank) is not int or not 0 < rank <= MAX_RANK or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{folder}: adapter_config.json needs an integer r in [1, {MAX_RANK}] and lora_alpha")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError(f"{folder}: per-module rank_pattern/alpha_pattern is not supported")
    return float(scaling), config.get("target_modules") or []


def load_adapter(span: BlockSpan, name: str, folder: str | Path) -> int:
    """Add adapter `name` from `folder` to the span's linear layers; returns how many layers it changes."""
    folder = Path(folder)
    scaling, _ = _read_config(folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"), device="cpu")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.search(key)
        if match is None:
            raise AdapterError(f"{folder}: unexpected tensor {key!r} (only LoRA A/B weights of decoder blocks)")
        block, module, which = int(match.group(1)), match.group(2), match.group(3)
        if span.start <= block < span.end:
            pairs.setdefault((block, module), {})[which] = tensor
    changed = 0
    for (block, module_path), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{folder}: block {block} {module_path} lacks lora_A or lora_B")
        layer = span.layers[block - span.start]
        parent_path, _, attr = module_path.rpartition(".")
        parent = layer.get_submodule(parent_path) if parent_path else layer
        target = getattr(parent, attr, None)
        if isinstance(target, nn.Linear):
            target = LoraLinear(target)
            setattr(parent, attr, target)
        if not isinstance(target, LoraLinear):
            raise AdapterError(f"{folder}: block {block} {module_path} is not a linear layer")
        base = target.base
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != base.in_features or b.shape != (base.out_features, a.shape[0]):
            raise AdapterError(f"{folder}: block {block} {module_path}: LoRA shapes do not fit the layer")
        device, dtype = base.weight.device, base.weight.dtype
        dtype = dtype if dtype.is_floating_point else torch.float32  # quantized bases keep float updates
        target.lora[name] = (a.to(device, dtype), b.to(device, dtype), scaling)
        changed += 1
    return changed


def load_adapters(span: BlockSpan, folders: list[str]) -> tuple[str, ...]:
    """Load every adapter; each is announced and requested by the name given on the command line."""
    for folder in folders:
        load_adapter(span, folder, folder)
    return tuple(folders)
