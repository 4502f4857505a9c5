"""Per-row LoRA for the PyTorch engine: many adapters (and none) in one batch.

Every linear layer inside the decoder blocks is wrapped once, at load. The resident adapters are
packed side by side: per layer, one A matrix [R, in] and one B matrix [out, R], where R is the sum
of their ranks (an adapter that skips a layer leaves zeros there). Before each forward pass a
[rows, R] mask is built that holds each row's adapter scale over its adapter's columns and zero
elsewhere, so every wrapped layer adds `((x @ A.T) * mask) @ B.T` to the base output: two small
matmuls however many adapters share the batch (the idea behind vLLM's and LoRAX's batched LoRA
kernels), and the base layer may be anything that maps x to y (plain, int8 or 4-bit). Batches with
no adapter rows skip it entirely.

Adapters change on the event loop while the engine thread runs forward passes, so a change builds
a new packed layout and the engine thread switches to it between steps.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Layout:
    columns: dict[int, tuple[int, int, float]] = field(default_factory=dict)  # slot -> (start, rank, scale)
    total: int = 0
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (A, B)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, name: str, manager: "LoRAManager"):
        super().__init__()
        self.base = base
        self.lora_name = name
        self._manager = [manager]  # in a list so nn.Module does not register it as a child

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        manager = self._manager[0]
        if manager.mask is None:
            return y
        packed = manager.active.weights.get(self.lora_name)
        if packed is None:
            return y
        a, b = packed
        x2 = x.reshape(-1, x.shape[-1]).to(a.dtype)
        h = torch.mm(x2, a.t()).mul_(manager.row_mask(x2.shape[0]))
        return torch.addmm(y.reshape(-1, y.shape[-1]).to(a.dtype), h, b.t()).view(y.shape).to(y.dtype)


class LoRAManager:
    """Wraps the model's linear layers; packs the resident adapters; builds each step's row mask."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        self.layers: dict[str, LoRALinear] = {}
        self.active = Layout()
        self.mask: torch.Tensor | None = None
        self._expanded: dict[int, torch.Tensor] = {}
        self._dirty = False
        self._adapters: dict[int, tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, int]] = {}
        self._lock = threading.Lock()
        self._next_slot = 1
        for prefix, block in _decoder_layers(model):
            for name, module in list(block.named_modules()):
                if name and (isinstance(module, nn.Linear) or _is_quantized_linear(module)):
                    full = f"{prefix}.{name}"
                    parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
                    wrapper = LoRALinear(module, full, self)
                    setattr(parent, name.rsplit(".", 1)[-1], wrapper)
                    self.layers[full] = wrapper
        self._device = _device(next(iter(self.layers.values())).base) if self.layers else torch.device("cpu")

    def base_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: _in_out(w.base) for name, w in self.layers.items()}

    def add(self, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> int:
        """Install an adapter's weights in a new slot and return the slot id."""
        rank = next(iter(modules.values()))[0].shape[0]
        weights = {n: (a.to(self._device, self.dtype), b.to(self._device, self.dtype)) for n, (a, b) in modules.items()}
        with self._lock:
            slot = self._next_slot
            self._next_slot += 1
            self._adapters[slot] = (weights, scale, rank)
            self._dirty = True
        return slot

    def remove(self, slot: int) -> None:
        """Forget a slot; the packed layout is rebuilt on the engine thread before the next step."""
        with self._lock:
            if self._adapters.pop(slot, None) is not None:
                self._dirty = True

    def begin_step(self, slots: list[int | None]) -> None:
        """Called by the engine thread before each forward: repack if adapters changed, build the row mask."""
        if self._dirty:
            with self._lock:
                self._dirty = False
                adapters = dict(self._adapters)
            self.active = self._pack(adapters)
        if all(s is None for s in slots):
            self.mask = None
            return
        mask = torch.zeros((len(slots), self.active.total), dtype=self.dtype)
        for row, slot in enumerate(slots):
            if slot is not None:
                start, rank, scale = self.active.columns[slot]
                mask[row, start:start + rank] = scale
        self.mask = mask.to(self._device)
        self._expanded = {mask.shape[0]: self.mask}

    def row_mask(self, rows: int) -> torch.Tensor:
        """The mask for `rows` flattened tokens: each sequence's row repeated over its tokens (prefill)."""
        expanded = self._expanded.get(rows)
        if expanded is None:
            expanded = self.mask.repeat_interleave(rows // self.mask.shape[0], dim=0)
            self._expanded[rows] = expanded
        return expanded

    def _pack(self, adapters: dict) -> Layout:
        columns, start = {}, 0
        for slot, (_, scale, rank) in sorted(adapters.items()):
            columns[slot] = (start, rank, scale)
            start += rank
        weights = {}
        for name, layer in self.layers.items():
            users = [(slot, w[name]) for slot, (w, _, _) in sorted(adapters.items()) if name in w]
            if not users:
                continue
            in_f, out_f = _in_out(layer.base)
            a = torch.zeros((start, in_f), dtype=self.dtype, device=self._device)
            b = torch.zeros((out_f, start), dtype=self.dtype, device=self._device)
            for slot, (wa, wb) in users:
                s, r, _ = columns[slot]
                a[s:s + r] = wa
                b[:, s:s + r] = wb
            weights[name] = (a, b)
        return Layout(columns, start, weights)


def _decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and len(module) > 0:
            return [(f"{name}.{i}", block) for i, block in enumerate(module)]
    raise ValueError("cannot find the decoder layers of this model for LoRA")


def _is_quantized_linear(module: nn.Module) -> bool:
    return hasattr(module, "in_features") and hasattr(module, "out_features") and not list(module.children())


def _device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _in_out(module: nn.Module) -> tuple[int, int]:
    return int(module.in_features), int(module.out_features)
