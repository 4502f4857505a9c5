"""What the int8 and int4 linear layers share: a call that flattens the input, casts it to the
kernel's dtype only where needed (a decode step makes ~200 of these calls), runs the packed-weight
kernel, adds the bias and returns the caller's shape and dtype. Subclasses give `_matmul`."""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    in_features: int
    out_features: int
    compute_dtype: torch.dtype

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """[rows, in_features] in compute_dtype, contiguous -> [rows, out_features]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.compute_dtype:
            x2 = x2.to(self.compute_dtype)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = self._matmul(x2)
        if self.bias is not None:
            y = y + self.bias
        y = y.view(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)
