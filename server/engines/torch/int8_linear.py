"""int8 weight-only linear layer on torch's own CPU kernel, `aten._weight_int8pack_mm`.

Each output row keeps its int8 weights and one scale (symmetric, amax / 127); the kernel reads
the int8 weights directly (half the bytes of bf16, a quarter of fp32) and scales the result.
Activations run through the kernel in `compute_dtype` (see quantize_linears.kernel_dtype: bf16 where that is
the fast path of the kernel) and come back in the caller's dtype. No child modules and public
`in_features`/`out_features`, so LoRA wraps it like any nn.Linear (lora.py).

Up to int8_gemv.MAX_ROWS rows (decode) run slimserve's own kernel where it could be built for this
CPU (int8_gemv.py: torch's kernel streams the weights slowly at one row); both multiply by the same weight
(the int8 values times the scales as stored), in fp32 accumulators, summing in another order. A layer built
with `any_rows` runs slimserve's kernel at every row count: the fp32 output head of an fp32 model
(quantize_linears.py), where torch's fp32 kernel is scalar (38 ms at 4 rows of SmolLM2's head against
1.2 ms for slimserve's, AMD EPYC, AVX-512).
"""

from __future__ import annotations

import torch
from torch import nn

from server.engines.torch import int8_gemv
from server.engines.torch.packed_linear import PackedLinear


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scales fp32 [out]) with weight ~= q * scales[:, None]."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scales


class Int8Linear(PackedLinear):
    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                 any_rows: bool = False):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scales", scales.to(compute_dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype))
        # the few-row kernel takes the same scales in fp32; None where it is off or not built here
        own = compute_dtype in (torch.bfloat16, torch.float32) and int8_gemv.off_reason() is None
        self.register_buffer("scales_fp32", self.scales.float() if own else None, persistent=False)
        self.any_rows = any_rows

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype, any_rows: bool = False) -> "Int8Linear":
        q, scales = quantize_int8_per_channel(linear.weight)
        return cls(q.to(linear.weight.device), scales.to(linear.weight.device), linear.bias, compute_dtype, any_rows)

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, as a float32 [out, in] matrix (the test reference)."""
        return self.weight_int8.float() * self.scales.float()[:, None]

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.scales_fp32 is not None and (self.any_rows or x2.shape[0] <= int8_gemv.MAX_ROWS) \
                and int8_gemv.enabled:
            return int8_gemv.gemv(x2, self.weight_int8, self.scales_fp32, None)
        return torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute={self.compute_dtype}"
