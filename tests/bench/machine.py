"""The machine a bench figure was measured on, for its JSON and its plot title: the CPU model (lscpu),
the SIMD flags that decide which kernels run (AVX2, AVX-512, AMX), what torch dispatches to, threads
and the load average (these machines are shared; a loaded run says so in its own output)."""

from __future__ import annotations

import os
import platform
import subprocess


def describe() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}
    flags = fields.get("Flags", "").split()
    try:
        import torch

        capability, threads = torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()
    except ImportError:
        capability, threads = None, None
    return {"model_name": fields.get("Model name") or "unknown", "cpu_family": fields.get("CPU family"),
            "cpu_model": fields.get("Model"), "cpus": os.cpu_count(), "arch": platform.machine(),
            "avx2": "avx2" in flags, "avx512": sorted(f for f in flags if f.startswith("avx512")),
            "amx": sorted(f for f in flags if f.startswith("amx")), "torch_capability": capability,
            "threads": threads, "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def summary(m: dict) -> str:
    simd = "AMX" if m["amx"] else "AVX-512" + (" bf16" if "avx512_bf16" in m["avx512"] else "") if m["avx512"] \
        else "AVX2" if m["avx2"] else "no AVX2"
    return f"{m['model_name']}, {m['cpus']} CPUs, {simd}, torch {m['torch_capability']}, {m['threads']} threads"
