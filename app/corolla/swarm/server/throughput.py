"""How many tokens per second this computer serves, measured locally and cached.

Like Petals, on one block built from the model's config with random weights, converted as served
(dtype, quantization): `inference_rps` from single-token steps with a growing cache, `forward_rps`
from long forward passes. No internet speed test: `network_rps` assumes 100 Mbit/s, which is what
Petals falls back to. Results are cached per device, model and dtype in a JSON file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from corolla.swarm.models.checkpoint import Checkpoint
from corolla.swarm.models.devices import dtype_name
from corolla.swarm.models.loading import build_skeleton
from corolla.swarm.models.quantization import quantize_linear_layers
from corolla.swarm.models.span import BlockSpan

logger = logging.getLogger(__name__)
ASSUMED_NETWORK_BITS = 100e6
CACHE_VERSION = 1


@dataclass(frozen=True)
class Throughput:
    inference_rps: float  # tokens/s per block, single-token steps
    forward_rps: float  # tokens/s per block, long forward passes
    network_rps: float

    def announced(self, num_blocks: int, using_relay: bool = False) -> float:
        """The `throughput` field: the bottleneck of compute over the span and the network."""
        compute = self.forward_rps / ((num_blocks + 1) / 2)
        return float(min(compute, self.network_rps * (0.2 if using_relay else 1.0)))


def cache_key(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, quant: str) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    # A local folder is keyed by its absolute path: `./model` means another model in another folder.
    source = str(Path(checkpoint.source_name).resolve()) if checkpoint.is_local else checkpoint.source_name
    model = source.replace("/", "--")
    return f"v{CACHE_VERSION}_model_{model}_device_{name.replace(' ', '_')}_dtype_{dtype_name(dtype)}_quant_{quant}"


def cached_throughput(
    checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, quant: str, cache_path: Path
) -> Throughput | None:
    cached = _read_cache(cache_path).get(cache_key(checkpoint, device, dtype, quant))
    try:
        return Throughput(**cached) if isinstance(cached, dict) else None
    except TypeError:  # an entry from another version
        return None


def save_throughput(
    checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, quant: str, cache_path: Path, value: Throughput
) -> None:
    """Record a measurement (only once the model has loaded: a model that fails gets no entry)."""
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(cache_path):
        data = _read_cache(cache_path)
        data[cache_key(checkpoint, device, dtype, quant)] = asdict(value)
        temporary = cache_path.with_name(cache_path.name + ".tmp")
        temporary.write_text(json.dumps(data, indent=2))
        os.replace(temporary, cache_path)


def get_throughput(
    checkpoint: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    quant: str,
    cache_path: Path | None,
    force_eval: bool = False,
) -> Throughput:
    if cache_path is not None and not force_eval:
        cached = cached_throughput(checkpoint, device, dtype, quant, cache_path)
        if cached is not None:
            return cached
    measured = measure(checkpoint, device, dtype, quant)
    if cache_path is not None:
        save_throughput(checkpoint, device, dtype, quant, cache_path, measured)
    return measured


def measure(
    checkpoint: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    quant: str,
    inference_steps: int = 100,
    forward_tokens: int = 1024,
    forward_steps: int = 10,
    time_budget_s: float = 30.0,
) -> Throughput:
    """Measure on one randomly initialised block; stops early on slow machines (time budget)."""
    span = _random_block(checkpoint, device, dtype, quant)
    hidden = span.hidden_size
    cache = span.new_cache(inference_steps + 2)  # the sessions' cache: static, graphed on a GPU
    step = torch.randn(1, 1, hidden, device=device, dtype=dtype)
    span(step, cache)  # warm-up: allocates the cache
    span(step, cache)  # warm-up: captures the step's graph on a GPU
    started, steps = time.perf_counter(), 0
    while steps < inference_steps and time.perf_counter() - started < time_budget_s / 2:
        span(step, cache)
        steps += 1
    _sync(device)
    inference_rps = steps / (time.perf_counter() - started)

    block = torch.randn(1, forward_tokens, hidden, device=device, dtype=dtype)
    started, steps = time.perf_counter(), 0
    while steps < forward_steps and time.perf_counter() - started < time_budget_s / 2:
        span(block)
        steps += 1
    _sync(device)
    forward_rps = steps * forward_tokens / (time.perf_counter() - started)
    network_rps = ASSUMED_NETWORK_BITS / (hidden * 16)
    result = Throughput(float(inference_rps), float(forward_rps), float(network_rps))
    logger.info("measured throughput: %s", result)
    return result


def _random_block(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, quant: str) -> BlockSpan:
    model = build_skeleton(checkpoint, dtype)
    family = checkpoint.family
    layers = nn.ModuleList([family.decoder_layers(model)[0]])
    layers.to_empty(device=torch.device("cpu") if quant != "none" else device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, param in layers.named_parameters():
            values = torch.randn(param.shape, generator=generator) * (0.02 if param.ndim > 1 else 0.0)
            param.copy_(values + (1.0 if param.ndim == 1 and "norm" in name else 0.0))
    layers.requires_grad_(False)
    if quant != "none":
        quantize_linear_layers(layers, quant, device, dtype)
    rotary = family.rotary_embedding(model)
    return BlockSpan(
        family, checkpoint.config, 0, 1, layers.eval(), rotary.to(device) if rotary else None, device, dtype, quant
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
