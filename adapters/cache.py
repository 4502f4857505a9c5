"""Which adapters stay resident: at most `capacity`, least recently used out first.

Pinned adapters are never evicted, and neither is one that a running request is using (the
caller says which are busy). Pure bookkeeping: no tensors, no I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class NoRoom(RuntimeError):
    """Every resident adapter is pinned or busy, so nothing can make room."""


class AdapterLRU:
    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._order: OrderedDict[str, bool] = OrderedDict()  # name -> pinned; last = most recent

    def __contains__(self, name: str) -> bool:
        return name in self._order

    def __len__(self) -> int:
        return len(self._order)

    def names(self) -> list[str]:
        return list(self._order)

    def pinned(self, name: str) -> bool:
        return self._order.get(name, False)

    def touch(self, name: str) -> None:
        if name in self._order:
            self._order.move_to_end(name)

    def victims_for(self, incoming: str, busy: Callable[[str], bool]) -> list[str]:
        """Names to evict so that `incoming` fits; raises NoRoom when that is impossible."""
        if incoming in self._order:
            return []  # a replacement reuses its own place
        excess = len(self._order) + 1 - self.capacity
        if excess <= 0:
            return []
        victims = [n for n, pinned in self._order.items() if not pinned and not busy(n)][:excess]
        if len(victims) < excess:
            raise NoRoom(f"all {self.capacity} adapter places are held by pinned or busy adapters")
        return victims

    def add(self, name: str, pinned: bool) -> None:
        self._order[name] = pinned or self._order.get(name, False)
        self._order.move_to_end(name)

    def remove(self, name: str) -> None:
        self._order.pop(name, None)
