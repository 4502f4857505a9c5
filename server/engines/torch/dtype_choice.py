"""`dtype: auto` for the PyTorch engine: the dtype chosen per device, from measured facts, with the reason.

On a CPU, bf16 pays only where the CPU computes it natively (avx512_bf16 or AMX, and torch's
kernels dispatching to AVX-512): there bf16 halves the bytes each decode step reads. On an
AVX2-only CPU torch emulates bf16 and measured prefill is ~2.6x slower than fp32 (issue #19), so
auto picks fp32 there. On a GPU the config's own dtype is kept (fp32 when it names none). An
explicit dtype is always honoured, except fp16 on a CPU, which falls back to fp32 (slow or missing
matmuls there).

The decision is a pure function of (requested, config dtype, device, CPU flags, torch's CPU
capability), so tests inject both kinds of CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86; "bf16" is the aarch64 feature name
_NO_AVX512 = ("DEFAULT", "NO AVX", "AVX", "AVX2")  # torch.backends.cpu.get_cpu_capability() values


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def native_bf16(flags: dict[str, bool] | set[str], capability: str | None, machine: str = "x86_64") -> str | None:
    """The flag that makes bf16 native here, or None. On x86 torch must also dispatch to its AVX-512
    kernels (ATEN_CPU_CAPABILITY=avx2 turns them off, and then bf16 is emulated again)."""
    have = {f for f, ok in flags.items() if ok} if isinstance(flags, dict) else set(flags)
    if machine in ("aarch64", "arm64"):
        return "bf16" if "bf16" in have else None
    if capability is not None and capability.upper() in _NO_AVX512:
        return None
    return next((f for f in NATIVE_BF16_FLAGS if f in have), None)


def choose_dtype(requested: str, config_dtype, device: torch.device, *, flags: dict[str, bool] | set[str] | None = None,
                 capability: str | None = None, machine: str | None = None) -> DtypeChoice:
    """The dtype to load in and why. `flags`/`capability`/`machine` default to this machine's."""
    if requested != "auto":
        dtype = DTYPES[requested]
        if device.type == "cpu" and dtype == torch.float16:
            return DtypeChoice(torch.float32, "float16 was asked for; CPUs lack fast fp16 matmuls, so float32")
        return DtypeChoice(dtype, f"{requested} was asked for")
    if device.type != "cpu":
        dtype = config_dtype if isinstance(config_dtype, torch.dtype) else DTYPES.get(str(config_dtype))
        if dtype is None:
            return DtypeChoice(torch.float32, f"auto on {device.type}: the config names no dtype, so float32")
        return DtypeChoice(dtype, f"auto on {device.type}: the config's dtype")
    if flags is None or capability is None or machine is None:
        from server.engines.vllm_kernels import cpu_info

        info = cpu_info()
        if flags is None:
            flags = info.get("flags") or {}
            if not flags and info.get("torch_sees", {}).get("avx512_bf16"):
                flags = {"avx512_bf16": True}  # no /proc/cpuinfo: torch's own probe
        if capability is None:
            capability = info.get("torch_capability")
        if machine is None:
            machine = info.get("machine") or "x86_64"
    flag = native_bf16(flags, capability, machine)
    if flag:
        return DtypeChoice(torch.bfloat16, f"auto on cpu: {flag} computes bf16 natively (torch dispatches to "
                                           f"{capability}), so bfloat16 halves the bytes read per token")
    have = {f for f, ok in flags.items() if ok} if isinstance(flags, dict) else set(flags)
    if any(f in NATIVE_BF16_FLAGS for f in have):  # the flags are there but torch's kernels do not use them
        why = f"torch dispatches to {capability}"
    else:
        why = f"no {' or '.join(NATIVE_BF16_FLAGS)} on this cpu"
    return DtypeChoice(torch.float32, f"auto on cpu: {why}, bf16 would be emulated (prefill ~2.6x slower), "
                                      "so float32")
