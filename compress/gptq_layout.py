"""Read and write the integer codes of a GPTQ-format checkpoint (GPTQModel's `gptq` v1 layout).

A quantized linear stores `qweight` int32 [in * bits / 32, out] (32 / bits input rows per word,
lowest bits first), `qzeros` int32 [groups, out * bits / 32] holding zero point - 1 (the v1
convention GPTQModel and AutoGPTQ write), `scales` fp16 [groups, out] and `g_idx` int32 [in] (the
group of each input column; act-order permutes it). The weight is `scales[g_idx] * (q - zero)`.
Recovery training (compress/quant_recovery.py) changes the codes and scales on the artifact's
own grid and writes them back here, so the served artifact is exactly the trained model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PACKABLE_BITS = (2, 4, 8)  # 3-bit codes straddle words; not supported here


def _shifts(bits: int) -> torch.Tensor:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"{bits}-bit GPTQ codes are not supported here (only {PACKABLE_BITS})")
    return torch.arange(0, 32, bits, dtype=torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [r, c] packed along rows -> codes [r * 32 / bits, c]."""
    shifts = _shifts(bits)
    codes = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & (2**bits - 1)
    return codes.reshape(-1, packed.shape[1])


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    shifts = _shifts(bits)
    per = len(shifts)
    c = codes.to(torch.int32).reshape(-1, per, codes.shape[1])
    return (c << shifts.view(1, -1, 1)).sum(dim=1, dtype=torch.int32)


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [r, c] packed along columns -> codes [r, c * 32 / bits]."""
    return unpack_rows(packed.t().contiguous(), bits).t().contiguous()


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_rows(codes.t().contiguous(), bits).t().contiguous()


@dataclass
class QuantizedLinear:
    """One layer's codes and grid, in unpacked form. codes [out, in], scales/zeros [groups, out]."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], bits: int) -> "QuantizedLinear":
        codes = unpack_rows(tensors["qweight"], bits).t().contiguous()
        zeros = unpack_cols(tensors["qzeros"], bits) + 1  # v1 stores zero - 1
        return cls(codes, tensors["scales"].float(), zeros, tensors["g_idx"].long(), bits)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        maxq = 2**self.bits - 1
        if int(self.codes.min()) < 0 or int(self.codes.max()) > maxq:
            raise ValueError(f"codes outside 0..{maxq}")
        return {"qweight": pack_rows(self.codes.t().contiguous(), self.bits),
                "qzeros": pack_cols((self.zeros - 1).to(torch.int32), self.bits),
                "scales": self.scales.to(torch.float16), "g_idx": self.g_idx.to(torch.int32)}

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] the kernels compute with."""
        s = self.scales.t()[:, self.g_idx]
        z = self.zeros.t()[:, self.g_idx].float()
        return s * (self.codes.float() - z)
