"""Full-precision linear layers on weights prepacked once for oneDNN (#19 item 2).

`nn.Linear` on a CPU hands its plain [out, in] weight to oneDNN on every call, which reorders it
into its blocked layout each time; a decode step makes ~200 such calls on small inputs, so the
reorder is a large share of the step. Here each weight is reordered once, at load
(`mkldnn._reorder_linear_weight`), and every call runs `mkldnn._linear_pointwise` on the packed
tensor — the pair torch's own inductor uses after freezing a CPU model. Measured on an AMD EPYC
(AVX-512 bf16, no AMX), 2 threads, decode shapes of SmolLM2-135M: bf16 1.4-2.6x faster per matmul
and bit-identical; fp32 1.3-2.1x, equal to ~1e-6 (another summation order).

The packed tensor is opaque (no storage), so it is kept as a plain attribute, not a buffer: nothing
serialises, moves or counts it by accident; `extra_weight_bytes` reports its size
(compress.load_time.weight_bytes reads it). No child modules and public in/out features, so LoRA
wraps it like any nn.Linear (lora.py).
"""

from __future__ import annotations

import torch
from torch import nn

from server.engines.torch.packed_linear import PackedLinear


def plain_weight(m: nn.Linear) -> bool:
    """A dense bf16/fp32 CPU weight (not a quantized tensor subclass, not renamed by a quantizer)."""
    w = m.__dict__.get("_parameters", {}).get("weight")
    return (w is not None and type(w) in (nn.Parameter, torch.Tensor) and w.device.type == "cpu"
            and w.dtype in (torch.bfloat16, torch.float32))


def can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs weights of this dtype on this CPU (bf16 needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT:
    an AVX2-only CPU refuses it, and the engine keeps nn.Linear there)."""
    try:
        pack_weight(torch.zeros(8, 8, dtype=dtype))
    except RuntimeError:
        return False
    return True


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The oneDNN-blocked copy of a [out, in] weight (the batch-size hint 1: decode; any row count runs)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


class OneDNNLinear(PackedLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = weight.dtype
        self.packed = pack_weight(weight)
        self.extra_weight_bytes = weight.numel() * weight.element_size()
        self.register_buffer("bias", None)  # passed to the kernel instead (one pass over the output)
        self.register_buffer("fused_bias", None if bias is None else bias.detach().to(weight.dtype).contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "OneDNNLinear":
        return cls(linear.weight, linear.bias)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.fused_bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.compute_dtype}, oneDNN prepacked"
