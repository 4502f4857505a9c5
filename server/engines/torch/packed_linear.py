"""What the packed linear layers (int8, int4, oneDNN) share: a call that flattens the input, casts it to
the kernel's dtype only where needed (a decode step makes ~200 of these calls), runs the packed-weight
kernel, adds the bias and returns the caller's shape and dtype (subclasses give `_matmul`); and putting
such a layer in a model's place."""

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


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` is."""
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], new)


def untie_head(model: nn.Module) -> None:
    """The output head is now its own packed or quantized copy: nothing may re-tie it to the input
    embedding (transformers re-ties them on tie_weights() while tie_word_embeddings is set)."""
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
