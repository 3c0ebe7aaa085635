"""Model residency: live models (pipelines) kept between jobs, least recently used first out.

The manager knows nothing about diffusion: a resident is any object, loaded by a function the
node supplies, under a key that identifies it (checkpoint fingerprint, dtype, device). A model
in use by a running node is locked and never evicted. Live models live here and only here: the
output cache holds recipes, never pipelines.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass
class ResidentModel:
    key: Hashable
    value: Any
    loaded_at: float
    last_used: float
    locks: int = 0


class ModelManager:
    def __init__(self, max_resident: int = 1, device: str = "auto", vram_budget: str | int | None = None,
                 ram_budget: str | int | None = None) -> None:
        self.max_resident = max_resident
        self.device = device
        self.vram_budget, self.ram_budget = vram_budget, ram_budget
        self._entries: OrderedDict[Hashable, ResidentModel] = OrderedDict()
        self._lock = threading.Lock()

    @contextmanager
    def use(self, key: Hashable, load: Callable[[], Any]) -> Iterator[Any]:
        """The resident model for `key` (loaded by `load()` when absent), locked while in use."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._make_room(self.max_resident - 1)
                now = time.monotonic()
                entry = self._entries[key] = ResidentModel(key, load(), now, now)
            self._entries.move_to_end(key)
            entry.locks += 1
        try:
            yield entry.value
        finally:
            with self._lock:
                entry.locks -= 1
                entry.last_used = time.monotonic()

    def drop(self, key: Hashable) -> None:
        """Forget a model (e.g. one left in an unknown state); the next use loads it afresh."""
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._make_room(0)

    def resident(self) -> list[ResidentModel]:
        with self._lock:
            return list(self._entries.values())

    def status(self) -> dict[str, Any]:
        """Devices, budgets and resident models as JSON (`nodegraph models status`, `GET /api/system`)."""
        return {"device": self.device, "residents": [
            {"key": repr(e.key), "locks": e.locks, "last_used": e.last_used} for e in self.resident()]}

    def _make_room(self, keep: int) -> None:
        for key in [k for k, e in self._entries.items() if e.locks == 0]:
            if len(self._entries) <= keep:
                break
            del self._entries[key]
