"""Model residency: which live models stay in memory, on which device, within which budget.

The manager knows nothing about diffusion. A resident is any object that can say how many bytes
of tensors it holds on each device, move itself to another device and release what it holds
(the `Residency` protocol); the node pack supplies the loader. What the manager decides:

- where a model goes: the compute device when it fits the device's budget (after evicting least
  recently used unlocked models), else loaded with offloading (`Placement.offload`);
- what eviction means: a model on a GPU moves to the CPU when the RAM budget has room for it (a
  fast return later: "reload"), else it is released; a model on the CPU is released (the next use
  loads it again from its memory-mapped safetensors files);
- that a model in use by a running node (locked) is never evicted;
- what caches beside the models may hold (`Pool`, such as the node pack's LoRA cache): their bytes count
  in the same budgets; they grow only into room that models leave (`room`, which never evicts a model),
  and when a model needs room they are shrunk first, least recently used entries first, before any model
  is evicted (an entry is refilled from a file in milliseconds, a model in seconds).

`text_encoder_device` (default: the compute device) is where the node pack keeps a pipeline's text
encoders (T5 is large and runs once per prompt); a resident that can say so (`component_memory`)
is listed per component, so `models status` shows where each part's bytes are.

Budgets are bytes (`8G`, `512M`, `1073741824`) or a percentage of the device's memory (`50%`).
Models may fill a budget up to its reserve, the part kept free for inference (activations grow
with image size and batch). Accounting is by the residents' real tensor bytes, measured after
every use (a LoRA load or fuse changes them).
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from nodegraph.devices import check_name, check_present, device_memory, resolve_device
from nodegraph.devices import device_kind as device_kind  # (re-exported: the engine's modules use it)
from nodegraph.sizes import OptionError as OptionError  # (re-exported: the manager's callers use them)
from nodegraph.sizes import format_bytes as format_bytes
from nodegraph.sizes import parse_size as parse_size
from nodegraph.threads import ThreadPolicy

DEFAULT_VRAM_BUDGET = "90%"
DEFAULT_RAM_BUDGET = "50%"
RESERVE = 0.1  # of each budget, kept free for inference

Report = Callable[[str, str, float | None], None]  # kind (loading, load, offload, evict, reload), message, seconds


def _quiet(kind: str, message: str, seconds: float | None) -> None:
    """The default report: nobody is listening."""


class Residency(Protocol):
    def memory(self) -> dict[str, int]:
        """Bytes of tensors held on each device ("cpu", "cuda:0", ...)."""

    def move(self, device: str) -> None:
        """Move to `device` (a GPU model evicted to the CPU, and back)."""

    def release(self) -> None:
        """Free what is held outside Python's reach (offload files); called once, when evicted."""


class Pool(Protocol):
    """A cache beside the models whose bytes count in the budgets (the LoRA cache): every entry can go."""

    name: str

    def memory(self) -> dict[str, int]:
        """Bytes held on each device ("cpu", "cuda:0", ...)."""

    def count(self) -> int:
        """How many entries it holds (for `models status`)."""

    def shrink(self, kind: str, size: int) -> None:
        """Drop least recently used entries on devices of `kind` until `size` bytes are freed, or all of them."""


@dataclass(frozen=True)
class Placement:
    device: str  # where the model computes
    offload: bool = False  # larger than the device's budget: load it with offloading


@dataclass
class ResidentModel:
    key: Hashable
    name: str
    value: Any
    device: str
    offloaded: bool
    loaded_at: float
    last_used: float
    memory: dict[str, int] = field(default_factory=dict)
    locks: int = 0
    components: list[dict[str, Any]] = field(default_factory=list)  # name, dtype, bytes per device
    moved: int = 0  # bytes moved off the GPU when evicted to the CPU (parts kept on the CPU stay out of it)

    def on(self, kind: str) -> int:
        """Bytes held on devices of `kind` ("cpu" or "gpu")."""
        return sum(n for device, n in self.memory.items() if device_kind(device) == kind)

    def to_json(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"name": self.name, "key": [str(k) for k in self.key] if isinstance(self.key, tuple) else str(self.key),
                "device": self.device, "offloaded": self.offloaded, "bytes": dict(self.memory),
                "loaded_seconds_ago": round(now - self.loaded_at, 3),
                "idle_seconds": 0.0 if self.locks else round(now - self.last_used, 3), "locked": self.locks > 0,
                "components": [dict(c) for c in self.components]}


class ModelManager:
    def __init__(self, device: str = "auto", vram_budget: str | int | None = None,
                 ram_budget: str | int | None = None, reserve: float = RESERVE,
                 text_encoder_device: str | None = None, threads: int | None = None) -> None:
        check_name(device, "device")
        if text_encoder_device is not None:
            check_name(text_encoder_device, "text_encoder_device (--text-encoder-device)")
        self.requested_device = device
        self.requested_text_encoder_device = text_encoder_device
        self._budgets = {"gpu": vram_budget or DEFAULT_VRAM_BUDGET, "cpu": ram_budget or DEFAULT_RAM_BUDGET}
        for text in self._budgets.values():
            parse_size(text, lambda: 100)  # bad input fails here, at start-up, not at the first load
        self.reserve = reserve
        self._device: str | None = None
        self._entries: dict[Hashable, ResidentModel] = {}  # least recently used first
        self._pools: dict[str, Pool] = {}
        self._lock = threading.Lock()  # the entries' bookkeeping (status() reads it from other threads)
        self._work = threading.RLock()  # one load, move or eviction at a time
        self.threads = ThreadPolicy(threads)  # torch's threads for the largest model in use

    def check_device(self) -> None:
        """Fail now, with what to do instead, when a requested device is not on this machine.

        Called at start-up by the commands that compute; `auto` and `cpu` are always there.
        """
        check_present(self.requested_device, "device", "--device")
        if self.requested_text_encoder_device is not None:
            check_present(self.requested_text_encoder_device, "text_encoder_device", "--text-encoder-device")

    @property
    def device(self) -> str:
        """The compute device, resolved on first use (so `nodegraph validate` never imports torch)."""
        if self._device is None:
            self._device = resolve_device(self.requested_device)
        return self._device

    @property
    def text_encoder_device(self) -> str | None:
        """Where text encoders live when the option is set (resolved like `device`); None: with the rest."""
        requested = self.requested_text_encoder_device
        return None if requested is None else resolve_device(requested)

    def budget(self, kind: str) -> int:
        """The budget of a device kind in bytes: "gpu" for the compute device, "cpu" for RAM."""
        device = self.device if kind == "gpu" else "cpu"
        if kind == "gpu" and device == "cpu":
            return 0
        return parse_size(self._budgets[kind], lambda: device_memory(device))

    def device_total(self) -> int:
        """All the memory of the compute device in bytes (the machine's RAM for the CPU), budgets aside."""
        return device_memory(self.device)

    def limit(self, kind: str) -> int:
        """What models may occupy: the budget less the reserve kept free for inference."""
        return int(self.budget(kind) * (1 - self.reserve))

    def used(self, kind: str) -> int:
        """Bytes on devices of `kind` held by models and by pools."""
        with self._lock:
            pools = list(self._pools.values())
        return self._models_used(kind) + sum(self._pool_bytes(pool, kind) for pool in pools)

    def _models_used(self, kind: str) -> int:
        with self._lock:
            return sum(e.on(kind) for e in self._entries.values())

    @staticmethod
    def _pool_bytes(pool: Pool, kind: str) -> int:
        return sum(n for device, n in pool.memory().items() if device_kind(device) == kind)

    def add_pool(self, pool: Pool) -> bool:
        """Count `pool`'s bytes in the budgets from now on (replacing a pool of the same name); False if it was."""
        with self._lock:
            known = self._pools.get(pool.name) is pool
            self._pools[pool.name] = pool
        return not known

    def remove_pool(self, pool: Pool) -> None:
        with self._lock:
            if self._pools.get(pool.name) is pool:
                del self._pools[pool.name]

    def room(self, kind: str, size: int) -> bool:
        """Can a pool add `size` bytes on devices of `kind`? Pools' least recently used entries are dropped to
        make room; models never are (a pool takes only the room models leave)."""
        with self._work:
            limit = self.limit(kind)
            if self._models_used(kind) + size > limit:
                return False  # not even with every pool emptied: drop nothing
            self._shrink_pools(kind, self.used(kind) + size - limit)
            return self.used(kind) + size <= limit

    def _apply_threads(self) -> None:
        """Set torch's threads for the largest model in use (nodegraph/threads.py); none in use: left as is."""
        with self._lock:
            sizes = [sum(e.memory.values()) for e in self._entries.values() if e.locks]
        if sizes:
            self.threads.apply(max(sizes))

    @contextmanager
    def use(self, key: Hashable, load: Callable[[Placement], Any], size: int = 0, name: str = "",
            report: Report = _quiet) -> Iterator[Any]:
        """The resident model for `key`, locked while inside.

        Absent: room is made for `size` bytes (an estimate; the real size is measured after loading)
        and `load(placement)` builds it. Evicted to the CPU: it comes back to the compute device.
        """
        name = name or str(key)
        with self._work:
            entry = self._entries.get(key)
            kind = device_kind(self.device)
            if entry is None:
                offload = not self._make_room(kind, size, report)
                started = time.perf_counter()
                report("loading", f"loading {name} on {self.device}", None)
                value = load(Placement(self.device, offload))
                now = time.monotonic()
                entry = ResidentModel(key, name, value, self.device, offload, now, now)
                self._measure(entry)
                with self._lock:
                    self._entries[key] = entry
                where = self.device + (" with offloading (larger than the budget)" if offload else "")
                report("load", f"loaded {name}: {format_bytes(sum(entry.memory.values()))} on {where}",
                       time.perf_counter() - started)
            elif entry.device != self.device:  # evicted from the GPU to the CPU earlier
                self._make_room(kind, entry.moved or entry.on("cpu"), report, keep=key)
                started = time.perf_counter()
                entry.value.move(self.device)
                entry.device = self.device
                self._measure(entry)
                report("reload", f"moved {name} back to {self.device}", time.perf_counter() - started)
            with self._lock:
                entry.locks += 1
                self._entries[key] = self._entries.pop(key)  # most recently used last
        self._apply_threads()
        try:
            yield entry.value
        finally:
            with self._lock:
                entry.locks -= 1
                entry.last_used = time.monotonic()
            self._apply_threads()
            with self._work:
                if key in self._entries:
                    self._measure(entry)  # adapters loaded or fused change the size
                    # text encoders on another device take room there too
                    for held in sorted({kind, *(device_kind(d) for d in entry.memory)}):
                        self._make_room(held, 0, report, keep=key)

    def get(self, key: Hashable) -> Any:
        """The resident value for `key` without using it, or None."""
        with self._lock:
            entry = self._entries.get(key)
        return None if entry is None else entry.value

    def drop(self, key: Hashable) -> None:
        """Forget a model (left in an unknown state, or to be rebuilt); the next use loads it afresh."""
        with self._work:
            entry = self._entries.get(key)
            if entry is not None:
                self._release(entry)

    def clear(self, report: Report = _quiet) -> None:
        """Empty the pools and release every model not in use (`POST /api/free`, and before retrying after out of
        memory)."""
        with self._work:
            for kind in ("cpu", "gpu"):
                self._shrink_pools(kind, self.used(kind))
            for entry in [e for e in self._entries.values() if not e.locks]:
                self._evict(entry, report, demote=False)

    def resident(self) -> list[ResidentModel]:
        with self._lock:
            return list(self._entries.values())

    def status(self) -> dict[str, Any]:
        """Devices, budgets and resident models as JSON (`nodegraph models status`, `GET /api/system`)."""
        budgets = {}
        for kind in ("gpu", "cpu"):
            if kind == "gpu" and device_kind(self.device) == "cpu":
                continue
            budgets["vram" if kind == "gpu" else "ram"] = {
                "device": self.device if kind == "gpu" else "cpu", "budget": self.budget(kind),
                "limit": self.limit(kind), "used": self.used(kind)}
        with self._lock:
            pools = list(self._pools.values())
        return {"device": self.device, "text_encoder_device": self.text_encoder_device or self.device,
                "budgets": budgets, "residents": [e.to_json() for e in self.resident()],
                "caches": [{"name": p.name, "entries": p.count(), "bytes": p.memory()} for p in pools]}

    def _measure(self, entry: ResidentModel) -> None:
        memory = entry.value.memory()
        parts = getattr(entry.value, "component_memory", None)
        components = parts() if parts is not None else []
        with self._lock:
            entry.memory, entry.components = memory, components

    def _shrink_pools(self, kind: str, excess: int) -> None:
        """Free `excess` bytes of `kind` from the pools, in the order they were added."""
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            if excess <= 0:
                return
            before = self._pool_bytes(pool, kind)
            pool.shrink(kind, excess)
            excess -= before - self._pool_bytes(pool, kind)

    def _make_room(self, kind: str, size: int, report: Report, keep: Hashable = None) -> bool:
        """Shrink the pools, then evict least recently used unlocked models of `kind`, until `size` more bytes
        fit the limit."""
        limit = self.limit(kind)
        if size > limit:
            return False
        self._shrink_pools(kind, self.used(kind) + size - limit)
        for entry in self.resident():
            if self.used(kind) + size <= limit:
                break
            if entry.key != keep and not entry.locks and entry.on(kind):
                self._evict(entry, report, demote=kind == "gpu")
        return self.used(kind) + size <= limit

    def _evict(self, entry: ResidentModel, report: Report, demote: bool) -> None:
        started = time.perf_counter()
        size = entry.on("gpu")
        if demote and not entry.offloaded and self._make_room("cpu", size, report, keep=entry.key):
            entry.value.move("cpu")
            entry.device, entry.moved = "cpu", size
            self._measure(entry)
            report("offload", f"moved {entry.name} to the CPU to make room", time.perf_counter() - started)
            return
        self._release(entry)
        report("evict", f"released {entry.name} ({format_bytes(sum(entry.memory.values()))})",
               time.perf_counter() - started)

    def _release(self, entry: ResidentModel) -> None:
        with self._lock:
            self._entries.pop(entry.key, None)
        entry.value.release()
        entry.value = None
        # Pipelines hold reference cycles (modules ↔ hooks); collect them now so the memory
        # returns before the next load, not at some later collection.
        gc.collect()
        if device_kind(self.device) == "gpu":
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
