"""Adapter names -> resident LoRA weights in one engine: load, unload, replace, just-in-time.

The registry validates (loader.py) before anything reaches the engine, keeps the LRU (cache.py),
and loads a just-in-time adapter once however many requests ask for it at the same moment.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from adapters.cache import AdapterLRU, NoRoom
from adapters.loader import AdapterError, LoRAWeights, check_name, load_lora, resolve_inside


class AdapterBackend(Protocol):
    """What an engine offers the registry."""

    def base_shapes(self) -> dict[str, tuple[int, int]]: ...

    async def install_adapter(self, weights: LoRAWeights) -> None: ...

    def uninstall_adapter(self, name: str) -> None: ...

    def adapter_in_use(self, name: str) -> bool: ...


class AdapterEvents(Protocol):
    def adapter_loaded(self, base: str, name: str, seconds: float, nbytes: int) -> None: ...

    def adapter_unloaded(self, base: str, name: str, reason: str) -> None: ...

    def adapter_failed(self, base: str, reason: str) -> None: ...


@dataclass
class AdapterRef:
    name: str
    path: Path
    base: str
    pinned: bool
    source: str  # startup | api | jit
    rank: int
    nbytes: int
    loaded_at: float


class AdapterRegistry:
    def __init__(self, base: str, backend: AdapterBackend, *, roots: list[Path], max_loras: int,
                 max_rank: int, events: AdapterEvents | None = None):
        self.base = base
        self.backend = backend
        self.roots = [Path(r) for r in roots]
        self.max_rank = max_rank
        self.events = events
        self.lru = AdapterLRU(max_loras)
        self.refs: dict[str, AdapterRef] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._shapes: dict[str, tuple[int, int]] | None = None

    def list(self) -> list[AdapterRef]:
        return [self.refs[n] for n in self.lru.names()]

    async def load(self, name: str, path: str | Path, *, pinned: bool = False, replace: bool = False,
                   source: str = "api") -> AdapterRef:
        check_name(name)
        async with self._lock(name):
            if name in self.refs and not replace:
                raise AdapterError(f"adapter '{name}' is already loaded; pass load_inplace to replace it",
                                   reason="exists")
            return await self._load_locked(name, path, pinned=pinned, source=source)

    async def unload(self, name: str) -> None:
        check_name(name)
        async with self._lock(name):
            if name not in self.refs:
                raise AdapterError(f"adapter '{name}' is not loaded", reason="not_loaded", status=404)
            self._drop(name, "unload")

    async def resolve(self, name: str) -> AdapterRef | None:
        """The adapter called `name`, loading it just in time from an adapter root; None if there is none."""
        ref = self.refs.get(name)
        if ref is not None:
            self.lru.touch(name)
            return ref
        if not self.roots or check_name_quietly(name) is None:
            return None
        candidates = [root / name for root in self.roots if (root / name).is_dir()]
        if not candidates:
            return None
        async with self._lock(name):
            if name in self.refs:  # someone else loaded it while we waited
                return self.refs[name]
            return await self._load_locked(name, candidates[0], pinned=False, source="jit")

    def declared_base(self, name: str) -> str | None:
        """The base model an adapter under the roots says it was trained on (adapter_config.json)."""
        if not self.roots or check_name_quietly(name) is None:
            return None
        for root in self.roots:
            config = root / name / "adapter_config.json"
            if config.is_file():
                try:
                    value = json.loads(config.read_text()).get("base_model_name_or_path")
                except (OSError, ValueError, AttributeError):
                    return None
                return value if isinstance(value, str) and value else None
        return None

    async def _load_locked(self, name: str, path: str | Path, *, pinned: bool, source: str) -> AdapterRef:
        start = time.perf_counter()
        try:
            folder = Path(path) if source == "startup" else resolve_inside(path, self.roots)
            weights = await asyncio.to_thread(load_lora, name, folder, self._base_shapes(), self.max_rank)
            victims = self.lru.victims_for(name, self.backend.adapter_in_use)
        except NoRoom as exc:
            self._failed("no_room")
            raise AdapterError(str(exc), reason="no_room", status=503) from None
        except AdapterError as exc:
            self._failed(exc.reason)
            raise
        try:
            await self.backend.install_adapter(weights)  # replaces in place when the name exists
        except AdapterError as exc:
            self._failed(exc.reason)
            raise
        for victim in victims:
            self._drop(victim, "evict")
        ref = AdapterRef(name, weights.path, self.base, pinned or (name in self.refs and self.refs[name].pinned),
                         source, weights.rank, weights.nbytes, time.time())
        self.refs[name] = ref
        self.lru.add(name, ref.pinned)
        if self.events:
            self.events.adapter_loaded(self.base, name, time.perf_counter() - start, weights.nbytes)
        return ref

    def _drop(self, name: str, reason: str) -> None:
        self.backend.uninstall_adapter(name)  # a running request keeps its weights until it ends
        self.refs.pop(name, None)
        self.lru.remove(name)
        if self.events:
            self.events.adapter_unloaded(self.base, name, reason)

    def _failed(self, reason: str) -> None:
        if self.events:
            self.events.adapter_failed(self.base, reason)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _base_shapes(self) -> dict[str, tuple[int, int]]:
        if self._shapes is None:
            self._shapes = self.backend.base_shapes()
        return self._shapes


def check_name_quietly(name: str) -> str | None:
    try:
        return check_name(name)
    except AdapterError:
        return None
