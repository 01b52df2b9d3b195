"""What this computer can contribute: accelerators and memory, and per model the memory each block
needs and how many blocks fit — computed from the model's config alone, before anything is loaded.
The answers are the API's own models (corolla.api.models), which GET /api/hardware returns."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass

import psutil

from corolla.api.models import Accelerator, BlockPlan, HardwareReport
from corolla.executable import corolla_command
from corolla.node.lazy_imports import engine_imports


def detect() -> HardwareReport:
    memory = psutil.virtual_memory()
    report = HardwareReport(
        os=f"{platform.system()} {platform.release()}",
        cpu=platform.processor() or platform.machine(),
        cpu_cores=psutil.cpu_count(logical=True) or 1,
        ram_total_bytes=memory.total,
        ram_available_bytes=memory.available,
    )
    report.accelerators += _cuda_devices()
    if platform.system() == "Darwin" and _mps_available():
        # MPS shares the unified memory with the CPU.
        report.accelerators.append(
            Accelerator(kind="mps", name="Apple GPU (MPS)", total_bytes=memory.total, free_bytes=memory.available)
        )
    report.accelerators.append(
        Accelerator(kind="cpu", name=report.cpu, total_bytes=memory.total, free_bytes=memory.available, source="psutil")
    )
    return report


def _mps_available() -> bool:
    with engine_imports():
        import torch

    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def _no_gpu_driver() -> bool:
    """Linux without the device nodes CUDA (NVIDIA), ROCm or WSL's GPU need: torch would find no GPU
    there, so it is not imported just to say so (an idle node stays without torch)."""
    if not sys.platform.startswith("linux") or "torch" in sys.modules:
        return False
    return not any(os.path.exists(node) for node in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


def _cuda_devices() -> list[Accelerator]:
    devices = _nvml_devices()
    if devices or _no_gpu_driver():
        return devices
    with engine_imports():
        import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        major, minor = torch.cuda.get_device_capability(index)
        found.append(
            Accelerator(
                kind="cuda",
                index=index,
                name=torch.cuda.get_device_name(index),
                total_bytes=total,
                free_bytes=free,
                compute_capability=f"{major}.{minor}",
            )
        )
    return found


def _nvml_devices() -> list[Accelerator]:
    """NVML where present: free memory without creating a CUDA context in this process."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            found.append(
                Accelerator(
                    kind="cuda",
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else name,
                    total_bytes=info.total,
                    free_bytes=info.free,
                    compute_capability=f"{major}.{minor}",
                    source="nvml",
                )
            )
        return found
    finally:
        pynvml.nvmlShutdown()


@dataclass(frozen=True)
class BlockSizes:
    """What a model's blocks need on one kind of device, from its config alone."""

    family: str
    num_blocks: int
    dtype: str
    bytes_per_block: int
    cache_bytes_per_block: int
    client_bytes: int


def plan_blocks(
    model: str,
    device_kind: str,
    free_bytes: int,
    dtype: str = "auto",
    quant_type: str = "none",
    memory_cap_bytes: int | None = None,
    token: str | None = None,
) -> BlockPlan:
    """Memory per block (weights plus the KV-cache budget a server reserves) and how many fit in 80% of
    the free memory (or the cap)."""
    sizes = block_sizes(model, device_kind, dtype, quant_type, token)
    usable = int(0.8 * free_bytes)
    if memory_cap_bytes is not None:
        usable = min(usable, memory_cap_bytes)
    per_block = sizes.bytes_per_block + sizes.cache_bytes_per_block
    return BlockPlan(
        model=model,
        family=sizes.family,
        num_blocks=sizes.num_blocks,
        dtype=sizes.dtype,
        quant_type=quant_type,
        bytes_per_block=sizes.bytes_per_block,
        cache_bytes_per_block=sizes.cache_bytes_per_block,
        client_bytes=sizes.client_bytes,
        device=device_kind,
        usable_bytes=usable,
        recommended_blocks=max(0, min(sizes.num_blocks, usable // per_block)),
    )


class PlanError(Exception):
    """The model's block plan could not be worked out: the model cannot be opened or is not supported."""


@functools.lru_cache(maxsize=16)
def block_sizes(model: str, device_kind: str, dtype: str, quant_type: str, token: str | None) -> BlockSizes:
    """The model's sizes, worked out here where torch is already imported, otherwise in a short-lived
    `corolla model block-sizes`: torch, transformers and the model code would cost an idle node (the
    window asks for the plan as it opens) about 140 MB that it keeps, where the child's seconds pass."""
    if "torch" in sys.modules:
        return block_sizes_here(model, device_kind, dtype, quant_type, token)
    request = {"model": model, "device_kind": device_kind, "dtype": dtype, "quant_type": quant_type, "token": token}
    done = subprocess.run(  # the token on stdin: a command line is visible to every user
        corolla_command("model", "block-sizes"), input=json.dumps(request), capture_output=True, text=True, timeout=600
    )
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        raise RuntimeError(f"working out the block plan failed: {tail[0]}") from None
    if "error" in answer:
        raise (PlanError if answer.get("engine_error") else RuntimeError)(answer["error"])
    return BlockSizes(**answer)


def block_sizes_here(model: str, device_kind: str, dtype: str, quant_type: str, token: str | None) -> BlockSizes:
    with engine_imports():
        import torch

        from corolla.swarm import protocol
        from corolla.swarm.models import open_checkpoint
        from corolla.swarm.models.devices import DTYPE_NAMES, checkpoint_dtype_of, dtype_name
        from corolla.swarm.models.loading import estimate_memory

    checkpoint = open_checkpoint(model, token=token)
    if dtype == "auto":
        resolved = torch.float32 if device_kind == "cpu" else (checkpoint_dtype_of(checkpoint.config) or torch.float16)
    else:
        resolved = DTYPE_NAMES[dtype]
    estimate = estimate_memory(checkpoint, resolved, quant_type)
    element = torch.empty((), dtype=resolved).element_size()
    cache_tokens = 2 * protocol.default_inference_max_length(checkpoint.config)
    return BlockSizes(
        family=checkpoint.family.name,
        num_blocks=checkpoint.num_blocks,
        dtype=dtype_name(resolved),
        bytes_per_block=max(estimate.per_block_bytes),
        cache_bytes_per_block=cache_tokens * 2 * checkpoint.family.kv_dim(checkpoint.config) * element,
        client_bytes=estimate.client_bytes,
    )
