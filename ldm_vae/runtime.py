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


def _meminfo_available() -> int | None:
    """Linux's MemAvailable (what can be allocated without swapping), or None without /proc."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 ``memory.max``, v1 ``limit_in_bytes``)."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:  # no limit (v1 writes a huge number)
            return None
        return max(0, int(limit) - usage)
    return None


def _address_space_headroom() -> int | None:
    """Bytes left under ``ulimit -v`` (RLIMIT_AS), or None when unlimited or unknown."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        return max(0, soft - size)
    except (ImportError, OSError, ValueError, StopIteration):
        return None


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes this process can still allocate on ``device``, or None where nothing says.

    CPU: the least of Linux's MemAvailable, the headroom under the cgroup limit and under ``ulimit -v``. CUDA:
    free memory as the driver reports it plus what PyTorch's caching allocator holds but does not use.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        idle = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + idle
    if device.type != "cpu":
        return None
    known = [
        m for m in (_meminfo_available(), _cgroup_headroom(), _address_space_headroom()) if m is not None
    ]
    return min(known) if known else None
