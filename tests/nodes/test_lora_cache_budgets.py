"""The LoRA cache as one of the model manager's pools (nodes/engine/lora_cache.py, nodegraph/models.py).

Its bytes count in the manager's RAM and VRAM budgets and show in its status; it keeps an entry only in room
that models leave, and gives way to a model before any model is evicted. Slot-ready entries live on the slot's
GPU when the VRAM budget has room, else in CPU memory: here "meta" stands in for the GPU (any device but the
CPU counts as one), the CUDA-only parts (pinned memory, copies that do not wait) are tested on a CUDA machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nodegraph.models import ModelManager, Placement
from nodes.engine import lora_cache
from nodes.engine.lora_cache import LoraCache

NAMES = ("tiny-sd15-style", "tiny-sd15-kohya", "tiny-sd15-te")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Model:
    """A resident that holds `size` bytes on its device."""

    def __init__(self, size: int, placement: Placement) -> None:
        self.size, self.device = size, placement.device

    def memory(self) -> dict[str, int]:
        return {self.device: self.size}

    def move(self, device: str) -> None:
        self.device = device

    def release(self) -> None:
        pass


def load(manager: ModelManager, name: str, size: int) -> None:
    with manager.use(name, lambda placement: Model(size, placement), size):
        pass


def paths(demo_dir: Path) -> list[str]:
    return [str(demo_dir / "loras" / f"{name}.safetensors") for name in NAMES]


def file_bytes(path: str) -> int:
    return sum(t.numel() * t.element_size() for t in LoraCache().read(path, "x").state.values())


def budget(limit: int) -> int:
    """The RAM budget whose limit (less the reserve) is `limit` bytes."""
    return int(limit / 0.9) + 1


def test_the_cache_counts_in_the_managers_budget_and_status(demo_dir: Path) -> None:
    cache, manager = LoraCache(), ModelManager(device="cpu", ram_budget="1G")
    cache.attach(manager)
    for path in paths(demo_dir)[:2]:
        cache.read(path, "x")
    held = sum(file_bytes(p) for p in paths(demo_dir)[:2])
    assert cache.bytes == held and manager.used("cpu") == held
    assert manager.status()["caches"] == [{"name": "lora", "entries": 2, "bytes": {"cpu": held}}]
    other = ModelManager(device="cpu", ram_budget="1G")
    cache.attach(other)  # counted in one manager at a time
    assert manager.used("cpu") == 0 and other.used("cpu") == held
    other.add_pool(LoraCache())  # another cache in its place (as benchmarks do): attaching again counts this one
    cache.attach(other)
    assert other.used("cpu") == held


def test_a_model_pushes_out_the_least_recently_used_files_before_any_model(demo_dir: Path) -> None:
    style, kohya, te = paths(demo_dir)
    sizes = {p: file_bytes(p) for p in paths(demo_dir)}
    manager = ModelManager(device="cpu", ram_budget=budget(1000 + sum(sizes.values())))
    cache = LoraCache()
    cache.attach(manager)
    load(manager, "a", 1000)
    for path in (style, kohya, te):
        cache.read(path, "x")
    cache.read(style, "x")  # used again: kohya is now the least recently used
    assert cache.reads == 3
    load(manager, "b", sizes[kohya])  # room for b: kohya's entry goes, not model a
    assert {str(e.key) for e in manager.resident()} == {"a", "b"}
    for path in (style, te):
        cache.read(path, "x")
    assert cache.reads == 3  # both kept
    cache.read(kohya, "x")
    assert cache.reads == 4


def test_a_file_is_kept_only_in_room_that_models_leave(demo_dir: Path) -> None:
    style = paths(demo_dir)[0]
    manager = ModelManager(device="cpu", ram_budget=budget(1000 + file_bytes(style) - 1))
    cache = LoraCache()
    cache.attach(manager)
    load(manager, "a", 1000)
    cache.read(style, "x")
    cache.read(style, "x")
    assert cache.reads == 2 and cache.bytes == 0  # read each time: never at a model's expense
    assert [str(e.key) for e in manager.resident()] == ["a"]


def test_a_cap_of_its_own_still_holds_under_a_manager(demo_dir: Path) -> None:
    style, kohya, _ = paths(demo_dir)
    cache, manager = LoraCache(max_bytes=file_bytes(style) + file_bytes(kohya) - 1), ModelManager(ram_budget="1G")
    cache.attach(manager)
    cache.read(style, "x")
    cache.read(kohya, "x")
    assert cache.bytes == file_bytes(kohya)


def test_a_job_with_a_lora_counts_the_cache_in_its_executors_manager(registry: Any, demo_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from nodegraph.executor import Executor
    from nodegraph.settings import Settings
    from tests.nodes.test_hotswap import graph, pixels

    monkeypatch.setattr(lora_cache, "CACHE", LoraCache())
    manager = ModelManager(device="cpu", ram_budget="4G")
    executor = Executor(registry, Settings(models_dirs=(demo_dir,), output_dir=tmp_path), models=manager)
    pixels(executor, graph("tiny-sd15-style", steps=1))
    [cache] = manager.status()["caches"]
    assert cache["name"] == "lora" and cache["entries"] >= 1 and cache["bytes"]["cpu"] >= file_bytes(paths(demo_dir)[0])
    models = sum(e.on("cpu") for e in manager.resident())
    assert manager.used("cpu") == models + cache["bytes"]["cpu"]


def slot_entry(cache: LoraCache, demo_dir: Path, device: str) -> Any:
    from diffusers import StableDiffusionPipeline

    path = paths(demo_dir)[0]
    key = lora_cache.slot_key(path, "x", ("sd15", "{}"), "s-s-", 8, torch.float32, device)
    ready = cache.build_slot_ready(key, StableDiffusionPipeline, family="sd15")
    assert isinstance(ready, lora_cache.SlotReady)
    return ready


def test_a_slot_entry_lives_on_the_gpu_when_the_vram_budget_has_room(demo_dir: Path) -> None:
    cache, manager = LoraCache(), ModelManager(device="cuda:0", vram_budget="1G", ram_budget="1G")
    cache.attach(manager)
    ready = slot_entry(cache, demo_dir, "meta")
    assert {t.device.type for pair in ready.tensors.values() for t in pair} == {"meta"}
    size = sum(t.numel() * t.element_size() for pair in ready.tensors.values() for t in pair)
    assert cache.memory()["meta"] == size and manager.used("gpu") == size  # counted as VRAM


def test_a_slot_entry_lives_in_cpu_memory_when_the_vram_budget_is_full(demo_dir: Path) -> None:
    cache, manager = LoraCache(), ModelManager(device="cuda:0", vram_budget=1000, ram_budget="1G")
    cache.attach(manager)
    ready = slot_entry(cache, demo_dir, "meta")
    assert {t.device.type for pair in ready.tensors.values() for t in pair} == {"cpu"}
    assert manager.used("gpu") == 0 and manager.used("cpu") == cache.bytes > 0
    hit = cache.slot_ready(lora_cache.slot_key(paths(demo_dir)[0], "x", ("sd15", "{}"), "s-s-", 8, torch.float32,
                                               "meta"))
    assert hit is ready  # kept, keyed by the slot's device, wherever it lives


def test_a_gpu_entry_gives_way_to_a_model_on_the_gpu(demo_dir: Path) -> None:
    cache, manager = LoraCache(), ModelManager(device="cuda:0", vram_budget=budget(10_000_000), ram_budget="1G")
    cache.attach(manager)
    slot_entry(cache, demo_dir, "meta")
    gpu_bytes = cache.memory()["meta"]
    load(manager, "a", 10_000_000 - gpu_bytes + 1)
    assert "meta" not in cache.memory() and [str(e.key) for e in manager.resident()] == ["a"]


@cuda
def test_on_cuda_entries_live_on_the_gpu_or_pinned_and_switches_from_them_copy_exactly(demo_dir: Path) -> None:
    for vram in ("1G", 1000):  # room on the GPU for the entry, and none (pinned CPU memory)
        cache, manager = LoraCache(), ModelManager(device="cuda:0", vram_budget=vram, ram_budget="1G")
        cache.attach(manager)
        ready = slot_entry(cache, demo_dir, "cuda:0")
        tensors = [t for pair in ready.tensors.values() for t in pair]
        assert all(t.is_cuda for t in tensors) if vram == "1G" else all(t.is_pinned() for t in tensors)
        targets = [(m, torch.empty_like(a, device="cuda:0"), torch.empty_like(b, device="cuda:0"))
                   for m, (a, b) in ready.tensors.items()]
        lora_cache.copy_into(targets, ready)
        torch.cuda.synchronize()
        for module, down, up in targets:
            assert torch.equal(down.cpu(), ready.tensors[module][0].cpu())
            assert torch.equal(up.cpu(), ready.tensors[module][1].cpu())


@cuda
def test_on_cuda_scales_are_written_exactly() -> None:
    scales = [torch.tensor(1.0, device="cuda:0") for _ in range(5)]
    lora_cache.write_scales(scales, [0.5, -1.25, 3.0, 0.0, 7.5])
    assert [float(t) for t in scales] == [0.5, -1.25, 3.0, 0.0, 7.5]
