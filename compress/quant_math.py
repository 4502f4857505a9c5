"""The tensor math of weight quantization, as pure functions tests can call directly.

`rtn_quantize` rounds each group of weights to the nearest of 2^bits levels. `gptq_quantize` is
GPTQ (Frantar et al., 2022): it quantizes one input column at a time and spreads each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian H = 2 X^T X of
the layer's calibration inputs, so the layer's *output* error is what gets minimised.
"""

from __future__ import annotations

import torch


def _scale_zero(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point for a [rows, group] block."""
    maxq = 2**bits - 1
    if sym:
        absmax = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
        scale = 2 * absmax / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        lo = w.amin(dim=1, keepdim=True).clamp(max=0)
        hi = w.amax(dim=1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / maxq).clamp(min=1e-8)
        zero = torch.round(-lo / scale)
    return scale, zero


def _fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return scale * (q - zero)


def rtn_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True) -> torch.Tensor:
    """Round-to-nearest, per group of `group_size` input columns; returns the dequantized weight."""
    w = weight.float()
    out = torch.empty_like(w)
    g = group_size if group_size > 0 else w.shape[1]
    for start in range(0, w.shape[1], g):
        block = w[:, start:start + g]
        scale, zero = _scale_zero(block, bits, sym)
        out[:, start:start + g] = _fake_quant(block, scale, zero, bits)
    return out.to(weight.dtype)


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2/n X^T X from calibration inputs [n, in_features] of one linear layer."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    return 2.0 * x.t() @ x / x.shape[0]


def gptq_quantize(weight: torch.Tensor, h: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True,
                  damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """GPTQ with lazy batch updates; returns the dequantized weight [out, in]."""
    w = weight.float().clone()
    cols = w.shape[1]
    h = h.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q_all = torch.zeros_like(w)
    g = group_size if group_size > 0 else cols
    block = g * max(1, block // g) if g < cols else cols  # whole groups per block
    scale = zero = None
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        w_blk = w[:, b0:b1].clone()
        err = torch.zeros_like(w_blk)
        for i in range(b1 - b0):
            col = b0 + i
            if col % g == 0:  # the group's grid, from its weights as updated so far
                scale, zero = _scale_zero(w_blk[:, i:i + g], bits, sym)
            d = hinv[col, col]
            q = _fake_quant(w_blk[:, i:i + 1], scale, zero, bits)
            q_all[:, col] = q[:, 0]
            e = (w_blk[:, i] - q[:, 0]) / d
            w_blk[:, i:] -= e.unsqueeze(1) @ hinv[col, col:b1].unsqueeze(0)
            err[:, i] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    return q_all.to(weight.dtype)


def output_error(weight: torch.Tensor, quantized: torch.Tensor, inputs: torch.Tensor) -> float:
    """Mean squared error of the layer's outputs on `inputs`: what quantization should keep small."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    return float(((x @ weight.float().t() - x @ quantized.float().t()) ** 2).mean())
