"""4-bit group-quantized linear layer on torch's own CPU kernels: weights packed once at load by
`aten._convert_weight_to_int4pack_for_cpu`, multiplied by `aten._weight_int4pack_mm_for_cpu`.

Each group of `group_size` consecutive input weights of a row has its own scale and zero point,
in the kernel's convention (asymmetric, zero point in the float domain):
    w ~= (q - 8) * scale + zero,   q in 0..15,   scale = (max - min) / 15,   zero = min + 8 * scale
The kernel takes scales and zeros together as one [in / group, out, 2] tensor in the activation
dtype. Like int8_linear.py: no child modules, public in_features/out_features (LoRA wraps it).
"""

from __future__ import annotations

import torch
from torch import nn

from server.engines.torch.packed_linear import PackedLinear

GROUP_SIZES = (32, 64, 128, 256)  # what the kernel accepts


def quantize_int4_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int32 [out, in] in 0..15, scales fp32 [out, in/group], zeros fp32 [out, in/group])."""
    out_f, in_f = weight.shape
    if group_size not in GROUP_SIZES or in_f % group_size:
        raise ValueError(f"group size {group_size} must be one of {GROUP_SIZES} and divide {in_f}")
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((hi - lo) / 15.0).clamp(min=1e-8)
    zeros = lo + 8.0 * scales
    q = torch.round((w - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(out_f, in_f), scales, zeros


def dequantize_int4_groups(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    out_f, in_f = q.shape
    groups = scales.shape[1]
    w = (q.float().reshape(out_f, groups, -1) - 8.0) * scales[..., None] + zeros[..., None]
    return w.reshape(out_f, in_f)


class Int4Linear(PackedLinear):
    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None,
                 group_size: int, compute_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1))
        both = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [in/group, out, 2]
        self.register_buffer("scales_and_zeros", both.to(compute_dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, compute_dtype: torch.dtype) -> "Int4Linear":
        q, scales, zeros = quantize_int4_groups(linear.weight, group_size)
        return cls(q, scales, zeros, linear.bias, group_size, compute_dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, float32 [out, in], rebuilt from the packed form."""
        eye = torch.eye(self.in_features, dtype=self.compute_dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight_int4, self.group_size,
                                                          self.scales_and_zeros).float().t().contiguous()

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_int4, self.group_size, self.scales_and_zeros)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"compute={self.compute_dtype}")
