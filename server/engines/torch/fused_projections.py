"""One packed matmul for the linears of a block that read the same input: q/k/v, and gate/up.

At one decode row a oneDNN call costs fixed work on 2 threads (waking the team, the barrier) besides
reading its weights, and a Llama block makes seven. Measured on SmolLM2's shapes (AMD EPYC, AVX-512
bf16, 2 threads, quiet): q, k and v as three calls 60 us, as one 27 us; gate and up as two 64 us, as
one 48 us; ~1.5 ms of a ~19 ms batch-1 step over 30 blocks. In the engine (tests/bench/int_kernels.py,
`bf16` vs `bf16-unfused`, best of 5): batch 1 52.9 -> 56.0 tok/s, batch 16 543.5 -> 575.7 (+6%).

The model's own forward still calls q_proj, k_proj and v_proj one after another on the same
hidden-state tensor, so each of them becomes a `SharedProjection`: the first call with a new input
runs the group's packed matmul and keeps the outputs; the others return their slice of it while
the input is that same tensor object (and recompute otherwise, so the result never depends on the
call order). LoRA wraps a SharedProjection like any linear (lora.py): an adapter on q_proj adds
its delta to q_proj's slice only.

The group's layer is oneDNN-prepacked by default; load-time int8/int4 (quantize_linears.py) passes a
builder that quantizes the joined weight instead. Both quantize each output row on its own (int8 one
scale a row, int4 groups along a row), so the joined layer holds exactly the members' quantized
weights. It matters more there, the int kernels having a larger fixed cost per call (SmolLM2, compiled
decode, one row, AMD EPYC, 2 threads: int4 96.1 -> 159.0 tok/s fused, int8 99.1 -> 115.6).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from server.engines.torch.onednn_linear import OneDNNLinear, plain_weight

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

# (joined weight [sum of outs, in], joined bias or None) -> the layer that runs the group
Builder = Callable[[torch.Tensor, "torch.Tensor | None"], nn.Module]


def layer_bytes(layer: nn.Module) -> int:
    """What a group's layer holds: its buffers, and an opaque packed weight's own report."""
    return int(getattr(layer, "extra_weight_bytes", 0)) + sum(b.numel() * b.element_size() for b in layer.buffers())


class FusedGroup:
    """The packed matmul of a group, and its outputs for the input it last saw. Not an nn.Module:
    its members hold it, and nothing should count, move or serialise it twice."""

    def __init__(self, linears: list[nn.Linear], build: Builder = OneDNNLinear):
        biases = [m.bias for m in linears]
        bias = torch.cat([b.detach() for b in biases]) if biases[0] is not None else None
        with torch.no_grad():
            self.layer = build(torch.cat([m.weight.detach() for m in linears]), bias)
        self.sizes = [m.out_features for m in linears]
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._input is not x:
            self._outputs = self.layer(x).split(self.sizes, dim=-1)
            self._input = x
        out = self._outputs[index]
        if index == len(self.sizes) - 1:  # the last member: let go of the tensors
            self._input, self._outputs = None, ()
        return out


class SharedProjection(nn.Module):
    """Stands where one linear of a fused group was: its slice of the group's output."""

    def __init__(self, group: FusedGroup, index: int, in_features: int, out_features: int):
        super().__init__()
        self._group = [group]  # in a list: not a child module
        self.index = index
        self.in_features, self.out_features = in_features, out_features
        self.extra_weight_bytes = layer_bytes(group.layer) * out_features // sum(group.sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group[0].output(x, self.index)

    def extra_repr(self) -> str:
        group = self._group[0]
        return (f"in_features={self.in_features}, out_features={self.out_features}, part {self.index + 1} of "
                f"{len(group.sizes)} fused ({type(group.layer).__name__})")


def _fusable(linears: list[nn.Module]) -> bool:
    if not all(type(m) is nn.Linear and plain_weight(m) for m in linears):
        return False
    first = linears[0]
    return all(m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
               and (m.bias is None) == (first.bias is None) for m in linears)


def fuse_projections(model: nn.Module, build: Builder = OneDNNLinear,
                     accept: Callable[[nn.Linear], bool] = lambda linear: True) -> int:
    """Replace every q/k/v and gate/up group of plain nn.Linear layers (each `accept`ed) by
    SharedProjections over one matmul, `build` making its layer. Returns the number of groups fused."""
    fused = 0
    for module in list(model.modules()):
        for names in GROUPS:
            linears = [getattr(module, n, None) for n in names]
            if any(m is None for m in linears) or not _fusable(linears) or not all(map(accept, linears)):
                continue
            group = FusedGroup(linears, build)
            for i, (name, linear) in enumerate(zip(names, linears)):
                setattr(module, name, SharedProjection(group, i, linear.in_features, linear.out_features))
            fused += 1
    return fused
