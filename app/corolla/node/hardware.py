"""What this computer can contribute: accelerators and memory, and per model the memory each block
needs and how many blocks fit — computed from the model's config alone, before anything is loaded."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field

import psutil

from corolla.node.lazy_imports import engine_imports


@dataclass
class Accelerator:
    kind: str  # cuda | mps | cpu
    index: int | None
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: str | None = None
    source: str = "torch"  # torch | nvml | psutil


@dataclass
class HardwareReport:
    os: str
    cpu: str
    cpu_cores: int
    ram_total_bytes: int
    ram_available_bytes: int
    accelerators: list[Accelerator] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


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
    with engine_imports():
        import torch

    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        # MPS shares the unified memory with the CPU.
        report.accelerators.append(Accelerator("mps", None, "Apple GPU (MPS)", memory.total, memory.available))
    report.accelerators.append(Accelerator("cpu", None, report.cpu, memory.total, memory.available, source="psutil"))
    return report


def _cuda_devices() -> list[Accelerator]:
    devices = _nvml_devices()
    if devices:
        return devices
    with engine_imports():
        import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        major, minor = torch.cuda.get_device_capability(index)
        found.append(Accelerator("cuda", index, torch.cuda.get_device_name(index), total, free, f"{major}.{minor}"))
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
                    "cuda",
                    index,
                    name.decode() if isinstance(name, bytes) else name,
                    info.total,
                    info.free,
                    f"{major}.{minor}",
                    source="nvml",
                )
            )
        return found
    finally:
        pynvml.nvmlShutdown()


@dataclass
class BlockPlan:
    model: str
    family: str
    num_blocks: int
    dtype: str
    quant_type: str
    bytes_per_block: int
    cache_bytes_per_block: int
    client_bytes: int
    device: str
    usable_bytes: int
    recommended_blocks: int

    def to_dict(self) -> dict:
        return asdict(self)


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
    per_block = max(estimate.per_block_bytes)
    element = torch.empty((), dtype=resolved).element_size()
    cache_tokens = 2 * protocol.default_inference_max_length(checkpoint.config)
    cache_per_block = cache_tokens * 2 * checkpoint.family.kv_dim(checkpoint.config) * element
    usable = int(0.8 * free_bytes)
    if memory_cap_bytes is not None:
        usable = min(usable, memory_cap_bytes)
    recommended = max(0, min(checkpoint.num_blocks, usable // (per_block + cache_per_block)))
    return BlockPlan(
        model=model,
        family=checkpoint.family.name,
        num_blocks=checkpoint.num_blocks,
        dtype=dtype_name(resolved),
        quant_type=quant_type,
        bytes_per_block=per_block,
        cache_bytes_per_block=cache_per_block,
        client_bytes=estimate.client_bytes,
        device=device_kind,
        usable_bytes=usable,
        recommended_blocks=recommended,
    )
