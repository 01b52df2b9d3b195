"""Which device and dtype a part of the model runs on, checked before anything is loaded."""

from __future__ import annotations

import torch

from corolla.swarm.models.errors import DeviceError

DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
QUANT_CHOICES = ("none", "int8", "nf4")


def resolve_device(requested: str | torch.device | None = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then the CPU; a named device must exist here."""
    if requested in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"{requested!r} is not a device name (use auto, cpu, cuda, cuda:N or mps)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("CUDA was requested but no CUDA GPU is usable on this computer")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceError(f"cuda:{index} does not exist; this computer has {torch.cuda.device_count()} GPU(s)")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("Apple MPS was requested but is not available on this computer")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device type {device.type!r} is not supported (use cpu, cuda or mps)")
    return device


def check_dtype_supported(
    dtype: torch.dtype, device_type: str, cuda_capability: tuple[int, int] | None = None, mps_bfloat16: bool = True
) -> None:
    """Refuse dtypes the device cannot run. Pure, so the rules are testable on any machine."""
    if dtype == torch.bfloat16:
        if device_type == "cuda" and cuda_capability is not None and cuda_capability < (8, 0):
            raise DeviceError(
                f"bfloat16 needs a GPU of compute capability 8.0 or newer; this one is "
                f"{cuda_capability[0]}.{cuda_capability[1]} (use --torch-dtype float16)"
            )
        if device_type == "mps" and not mps_bfloat16:
            raise DeviceError("bfloat16 on Apple MPS needs macOS 14 or newer (use float16)")


def resolve_dtype(
    requested: str | torch.dtype, device: torch.device, checkpoint_dtype: torch.dtype | None
) -> torch.dtype:
    """`auto`: the checkpoint's dtype on GPUs (float16 where bfloat16 cannot run), float32 on the CPU."""
    if isinstance(requested, torch.dtype):
        dtype = requested
    elif requested == "auto":
        if device.type == "cpu":
            dtype = torch.float32
        else:
            dtype = checkpoint_dtype if checkpoint_dtype in DTYPE_NAMES.values() else torch.float16
            try:
                _check_on(dtype, device)
            except DeviceError:
                dtype = torch.float16
    elif requested in DTYPE_NAMES:
        dtype = DTYPE_NAMES[requested]
    else:
        raise DeviceError(f"dtype {requested!r} is not one of {', '.join(DTYPE_CHOICES)}")
    if dtype not in DTYPE_NAMES.values():
        raise DeviceError(f"dtype {dtype} is not one of {', '.join(DTYPE_NAMES)}")
    _check_on(dtype, device)
    return dtype


def _check_on(dtype: torch.dtype, device: torch.device) -> None:
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    mps_bf16 = True
    if device.type == "mps":
        mps_bf16 = bool(getattr(torch.backends.mps, "is_macos_or_newer", lambda *_: True)(14, 0))
    check_dtype_supported(dtype, device.type, capability, mps_bf16)


def check_quantization_supported(quantization: str, device: torch.device) -> None:
    if quantization not in QUANT_CHOICES:
        raise DeviceError(f"quantization {quantization!r} is not one of {', '.join(QUANT_CHOICES)}")
    if quantization == "none":
        return
    if device.type == "mps":
        raise DeviceError(f"{quantization} quantization (bitsandbytes) is not available on Apple MPS; use none")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise DeviceError(f"{quantization} quantization needs bitsandbytes, which failed to import: {exc}") from exc


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def checkpoint_dtype_of(config) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    return DTYPE_NAMES.get(str(value).removeprefix("torch.")) if value else None
