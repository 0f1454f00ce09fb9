"""Device and dtype choices shared by the models, the CLI and the benchmarks."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = ("auto", *DTYPES)


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs bf16 matrix math natively (AVX512-BF16/AMX on CPU, Ampere+ on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """Maps ``auto``/``fp32``/``bf16``/``fp16`` (or a torch dtype) to a torch dtype.

    ``auto`` is bf16 where the hardware runs it natively and fp32 otherwise (never fp16: the SD VAE's
    activations overflow it).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return DTYPES[dtype]


def autocast_precision(mixed_precision: str) -> str:
    """Accelerate's ``mixed_precision`` for a training config's value: ``auto`` is bf16 where the hardware runs
    it natively and ``no`` (fp32) otherwise, since emulated bf16 is several times slower than fp32 (AVX2 CPUs).
    """
    if mixed_precision != "auto":
        return mixed_precision
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return "bf16" if native_bf16(device) else "no"


def memory_format_for(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.memory_format:
    """channels_last where oneDNN's reduced-precision convolutions want it; plain NCHW keeps fp32 bit-exact."""
    if dtype in (torch.bfloat16, torch.float16) and torch.device(device).type == "cpu":
        return torch.channels_last
    return torch.contiguous_format
