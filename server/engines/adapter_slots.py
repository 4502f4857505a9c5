"""Adapter names -> engine slots, with reference counts, shared by both engines.

A slot outlives a replaced or unloaded name until the last request using it ends, so swapping an
adapter in place never changes the weights under a running request. Thread-safe: requests start
on the event loop and may end on an engine thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class AdapterSlots:
    def __init__(self, free: Callable[[int], None]):
        self._free = free  # releases a slot's weights in the engine
        self._lock = threading.Lock()
        self._active: dict[str, int] = {}
        self._refs: dict[int, int] = {}
        self._retired: set[int] = set()

    def install(self, name: str, slot: int) -> None:
        """Point `name` at a slot the engine has just filled; the old slot retires."""
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

    def retain(self, slot: int) -> int | None:
        """One more reference to a slot someone already holds (a request's handle); None if it is gone."""
        with self._lock:
            if slot not in self._refs:
                return None
            self._refs[slot] += 1
            return slot

    def take(self, name: str | None, slot: int | None) -> int | None:
        """A generation's own reference: to the slot its request holds, else to the name's current one."""
        return self.retain(slot) if slot is not None else self.acquire(name) if name else None

    def release(self, slot: int) -> None:
        with self._lock:
            self._refs[slot] -= 1
            free = self._refs[slot] == 0 and slot in self._retired
            if free:
                self._retired.discard(slot)
                del self._refs[slot]
        if free:
            self._free(slot)

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
            self._free(slot)
