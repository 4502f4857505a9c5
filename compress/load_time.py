"""Quantization at load time, no calibration, through a transformers quantization_config: int8 as
torchao's weight-only int8 (per-channel scales); int4 and nf4 as bitsandbytes' 4-bit formats (fp4
and NormalFloat4, blocks of 64). The embeddings and the output head stay in the checkpoint's dtype.

The PyTorch engine on a CPU serves int8 and int4 on torch's own packed kernels instead
(server/engines/torch/quantize_linears.py, faster); this path remains for nf4, for other devices,
and for `compress eval REF@int8|int4` (compress imports nothing from server)."""

from __future__ import annotations

from typing import Any

import torch

METHODS = {"int8": "torchao int8 weight-only", "int4": "bitsandbytes fp4", "nf4": "bitsandbytes nf4",
           "fp8": "fp8 (vLLM on GPU only)"}


class QuantizationUnavailable(ValueError):
    pass


def load_time_config(method: str, compute_dtype: torch.dtype) -> Any:
    """A transformers quantization_config for `from_pretrained`."""
    if method == "int8":
        try:
            from torchao.quantization import Int8WeightOnlyConfig
            from transformers import TorchAoConfig
        except ImportError as exc:
            raise QuantizationUnavailable("int8 needs torchao: pip install 'slimserve[quant]'") from exc
        return TorchAoConfig(Int8WeightOnlyConfig())
    if method in ("int4", "nf4"):
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as exc:
            raise QuantizationUnavailable(f"{method} needs bitsandbytes: pip install 'slimserve[quant]'") from exc
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4" if method == "int4" else "nf4",
                                  bnb_4bit_compute_dtype=compute_dtype)
    if method == "fp8":
        raise QuantizationUnavailable("fp8 at load time is served by the vllm engine on a GPU")
    raise QuantizationUnavailable(f"unknown load-time quantization {method!r}; use one of {', '.join(METHODS)}")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the weights really occupy, counting the packed inner tensors of quantized tensor types."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        for inner in _leaves(t):
            key = inner.untyped_storage().data_ptr() if inner.device.type != "meta" else id(inner)
            if key in seen:
                continue  # tied weights count once
            seen.add(key)
            total += inner.numel() * inner.element_size()
    # weights kept outside parameters and buffers (opaque prepacked tensors) report their own size
    return total + sum(int(getattr(m, "extra_weight_bytes", 0)) for m in model.modules())


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, torch.nn.Parameter):
        return [t]
    names, _ = flatten()
    out = []
    for name in names:
        inner = getattr(t, name)
        if isinstance(inner, torch.Tensor):
            out.extend(_leaves(inner))
    return out
