"""Per-row LoRA for the PyTorch engine: many adapters (and none) in one batch.

Every linear layer inside the decoder blocks is wrapped once, at load. An adapter occupies a slot:
its A/B matrices sit in each targeted wrapper under the slot id. Before each forward pass the
scheduler says which rows use which slot; each wrapper adds `(x[rows] @ A.T) @ B.T * scale` to
the base output of those rows only, the way vLLM and LoRAX apply LoRA (so the base layer may be
anything that maps x to y: a plain, int8 or 4-bit linear). Rows without an adapter cost nothing.
"""

from __future__ import annotations

import threading

import torch
from torch import nn


class RowGroups:
    """Which rows of the current forward use which adapter slot: [(slot, row index tensor)]."""

    def __init__(self) -> None:
        self.groups: list[tuple[int, torch.Tensor]] = []

    def set(self, slots: list[int | None], device: torch.device) -> None:
        by_slot: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            if slot is not None:
                by_slot.setdefault(slot, []).append(row)
        self.groups = [(s, torch.tensor(rows, device=device)) for s, rows in by_slot.items()]


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, groups: RowGroups):
        super().__init__()
        self.base = base
        self.groups = groups
        self.slots: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.groups.groups or not self.slots:
            return y
        for slot, rows in self.groups.groups:
            lora = self.slots.get(slot)
            if lora is None:
                continue
            a, b, scale = lora
            xr = x.index_select(0, rows).to(a.dtype)
            delta = (xr @ a.t()) @ b.t()
            y = y.index_add(0, rows, (delta * scale).to(y.dtype))
        return y


class LoRAManager:
    """Wraps the model's linear layers and moves adapters in and out of slots."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.groups = RowGroups()
        self.dtype = dtype
        self.layers: dict[str, LoRALinear] = {}
        self._lock = threading.Lock()
        self._next_slot = 1
        decoder = _decoder_layers(model)
        for prefix, block in decoder:
            for name, module in list(block.named_modules()):
                if isinstance(module, nn.Linear) or _is_quantized_linear(module):
                    full = f"{prefix}.{name}"
                    parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
                    wrapper = LoRALinear(module, self.groups)
                    setattr(parent, name.rsplit(".", 1)[-1], wrapper)
                    self.layers[full] = wrapper

    def base_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: _in_out(w.base) for name, w in self.layers.items()}

    def add(self, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> int:
        """Install an adapter's weights in a new slot and return the slot id."""
        with self._lock:
            slot = self._next_slot
            self._next_slot += 1
        device = _device(next(iter(self.layers.values())).base) if self.layers else torch.device("cpu")
        for name, (a, b) in modules.items():
            self.layers[name].slots[slot] = (a.to(device, self.dtype), b.to(device, self.dtype), scale)
        return slot

    def remove(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.slots.pop(slot, None)


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


class AdapterSlots:
    """Adapter names -> slots, with reference counts so a slot outlives a replaced or unloaded name
    until the last request using it ends. Thread-safe: requests start on the event loop and end on
    the engine thread."""

    def __init__(self, manager: LoRAManager):
        self.manager = manager
        self._lock = threading.Lock()
        self._active: dict[str, int] = {}
        self._refs: dict[int, int] = {}
        self._retired: set[int] = set()

    def install(self, name: str, modules, scale: float) -> None:
        slot = self.manager.add(modules, scale)
        with self._lock:
            old = self._active.get(name)
            self._active[name] = slot
            self._refs[slot] = 0
        if old is not None:
            self._retire(old)

    def uninstall(self, name: str) -> None:
        with self._lock:
            slot = self._active.pop(name, None)
        if slot is not None:
            self._retire(slot)

    def acquire(self, name: str) -> int | None:
        with self._lock:
            slot = self._active.get(name)
            if slot is not None:
                self._refs[slot] += 1
            return slot

    def release(self, slot: int) -> None:
        with self._lock:
            self._refs[slot] -= 1
            free = self._refs[slot] == 0 and slot in self._retired
            if free:
                self._retired.discard(slot)
                del self._refs[slot]
        if free:
            self.manager.remove(slot)

    def in_use(self, name: str) -> bool:
        with self._lock:
            slot = self._active.get(name)
            return slot is not None and self._refs.get(slot, 0) > 0

    def resident_slots(self) -> int:
        with self._lock:
            return len(self._refs)

    def _retire(self, slot: int) -> None:
        with self._lock:
            free = self._refs.get(slot, 0) == 0
            if free:
                self._refs.pop(slot, None)
            else:
                self._retired.add(slot)
        if free:
            self.manager.remove(slot)
