"""`slimserve_gpu_memory_bytes{device,kind}`: GPU memory, where a GPU exists; no series otherwise
(absent, not zero, so a dashboard never mistakes a CPU server for an empty GPU).

kinds: `total` and `used` are device-wide (cudaMemGetInfo: they include vLLM's engine process,
whose weights and KV cache live outside this one); `reserved` and `allocated` are this process's
PyTorch caching allocator (the PyTorch engine's weights and KV cache)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import Gauge


def cuda_readings() -> dict[str, dict[str, int]]:
    """{device: {kind: bytes}} for every visible NVIDIA GPU; {} without one. NVML first: it reads the
    device without creating a CUDA context in this process (which would itself take GPU memory)."""
    out: dict[str, dict[str, int]] = {}
    try:
        import pynvml

        pynvml.nvmlInit()
        for i in range(pynvml.nvmlDeviceGetCount()):
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i))
            out[f"cuda:{i}"] = {"total": int(info.total), "used": int(info.used)}
    except Exception:  # no NVML library, no driver, no GPU
        out = {}
    try:
        import torch
    except ImportError:
        return out
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # this process computes on the GPU
        for i in range(torch.cuda.device_count()):
            row = out.setdefault(f"cuda:{i}", {})
            if "total" not in row:
                free, total = torch.cuda.mem_get_info(i)
                row.update(total=total, used=total - free)
            row.update(reserved=torch.cuda.memory_reserved(i), allocated=torch.cuda.memory_allocated(i))
    return out


class GpuMemory:
    def __init__(self, registry, read: Callable[[], dict[str, dict[str, int]]] = cuda_readings):
        self._read = read
        self._gauge: Gauge | None = None
        self._registry = registry

    def refresh(self) -> None:
        readings = self._read()
        if not readings:
            return
        if self._gauge is None:  # created at the first reading, so a machine without GPUs has no such metric
            self._gauge = Gauge("slimserve_gpu_memory_bytes", "GPU memory by device: total and used (device-wide), "
                                "reserved and allocated (this process's PyTorch allocator).", ["device", "kind"],
                                registry=self._registry)
        for device, kinds in readings.items():
            for kind, value in kinds.items():
                self._gauge.labels(device, kind).set(value)
