"""A linear layer as one opaque op in a compiled graph: `torch.ops.slimserve.linear(x, slot)`.

inductor cannot lower oneDNN's prepacked weights (opaque tensors without storage: a LoweringException
when it meets them) nor the int8/int4 packed kernels' layers, and it should not re-pack them: the
compiled decode step (compiled_decode.py) calls every linear through this op instead. The slot, a
constant in the graph, names a layer registered here; the op runs that layer's kernel eagerly. It is
registered through torch.library.Library rather than `custom_op`, whose Python wrapper measured ~70 us
a call (a decode step makes ~120 such calls) against ~10 us here; a Meta kernel gives the traced shape.

Layers are held weakly: an engine that is closed frees its weights; a graph that outlives them fails
loudly (the step then runs eagerly), never on another engine's layer.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

from server.engines.torch.int4_linear import Int4Linear
from server.engines.torch.int8_linear import Int8Linear
from server.engines.torch.onednn_linear import OneDNNLinear

_LIB = torch.library.Library("slimserve", "DEF")
_LIB.define("linear(Tensor x, int slot) -> Tensor")
_layers: dict[int, tuple[weakref.ref, int]] = {}  # slot -> (layer, out_features)
_slots = itertools.count()
# packed layers whose kernel runs straight from the op when the input is already in the kernel's dtype,
# skipping nn.Module's call and the cast checks on each of ~120 calls a step (int8 compiled, one row,
# in process: 115.6 -> 133.9 tok/s with this; docs/performance.md)
_DIRECT = (OneDNNLinear, Int8Linear, Int4Linear)


def register(layer: nn.Module) -> int:
    """A slot number for this layer (anything mapping [..., in] to [..., out_features])."""
    slot = next(_slots)
    _layers[slot] = (weakref.ref(layer), layer.out_features)
    return slot


def release(slots: list[int]) -> None:
    for slot in slots:
        _layers.pop(slot, None)


def _layer(slot: int) -> nn.Module:
    ref = _layers.get(slot)
    layer = ref[0]() if ref is not None else None
    if layer is None:
        raise RuntimeError(f"linear slot {slot} was released")
    return layer


def _run(x: torch.Tensor, slot: int) -> torch.Tensor:
    layer = _layer(slot)
    if type(layer) in _DIRECT and x.dtype == layer.compute_dtype and layer.bias is None:  # oneDNN: fused_bias
        y = layer._matmul(x.reshape(-1, layer.in_features).contiguous())
        return y.view(*x.shape[:-1], layer.out_features)
    return layer(x)


def _meta(x: torch.Tensor, slot: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _layers[slot][1]))


_LIB.impl("linear", _run, "CPU")
_LIB.impl("linear", _meta, "Meta")
linear = torch.ops.slimserve.linear.default
