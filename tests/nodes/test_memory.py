"""Model management with real pipelines on the CPU: budgets, eviction, offloading, out-of-memory, leaks."""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nodegraph import events as ev
from nodegraph.executor import Executor
from nodegraph.models import ModelManager
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodes.engine import pipelines, samplers
from nodes.engine.pipelines import estimate_bytes, resolve_dtype
from tests.conftest import Recorder
from tests.nodes.test_diffusion import graph

SD15, SDXL = "tiny-sd15", "tiny-sdxl"
STYLE = {"lora": "tiny-sd15-style.safetensors", "strength": 0.8}


def rss() -> int:
    """This process's resident memory in bytes (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def executor(registry: Registry, demo_dir: Path, tmp_path: Path, **options: Any) -> Executor:
    settings = Settings(models_dirs=(demo_dir,), output_dir=tmp_path / "out")
    return Executor(registry, settings, models=ModelManager(device="cpu", **options))


def run(executor: Executor, checkpoint: str, events: Recorder | None = None, **inputs: Any) -> np.ndarray:
    result = executor.run(graph(checkpoint, steps=1, **inputs), events if events is not None else Recorder())
    assert result.status == "ok", result.errors
    pixels: np.ndarray = result.nodes["show"].outputs["value"].pixels
    return pixels


@pytest.fixture(scope="module")
def sizes(demo_dir: Path) -> dict[str, int]:
    return {name: estimate_bytes(str(demo_dir / "checkpoints" / name), torch.float32) for name in (SD15, SDXL)}


@pytest.fixture(scope="module")
def reference(registry: Registry, demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Each checkpoint's image with no budget to speak of."""
    unlimited = executor(registry, demo_dir, tmp_path_factory.mktemp("ref"))
    return {name: run(unlimited, name) for name in (SD15, SDXL)}


def test_the_estimate_is_the_loaded_size(registry: Registry, demo_dir: Path, tmp_path: Path,
                                         sizes: dict[str, int]) -> None:
    ex = executor(registry, demo_dir, tmp_path)
    run(ex, SD15)
    [entry] = ex.models.resident()
    assert entry.memory.keys() == {"cpu"}
    assert entry.memory["cpu"] == pytest.approx(sizes[SD15], rel=0.01)  # non-persistent buffers are not in files


def test_alternating_checkpoints_stay_within_a_budget_that_fits_one(
        registry: Registry, demo_dir: Path, tmp_path: Path, sizes: dict[str, int],
        reference: dict[str, np.ndarray]) -> None:
    budget = int(max(sizes.values()) * 1.3)  # models may use 90%: one checkpoint fits, two do not
    assert sum(sizes.values()) > budget * 0.9 >= max(sizes.values())
    ex = executor(registry, demo_dir, tmp_path, ram_budget=budget)
    pipes: list[weakref.ref[Any]] = []
    run(ex, SD15)
    ex.cache.clear()
    gc.collect()
    baseline = rss()
    for i in range(50):
        name = (SD15, SDXL)[i % 2]
        events = Recorder()
        image = run(ex, name, events)
        ex.cache.clear()  # every job samples again, so every job needs its model
        np.testing.assert_array_equal(image, reference[name])
        [entry] = ex.models.resident()
        assert entry.name.startswith(name) and ex.models.used("cpu") <= ex.models.limit("cpu")
        pipes.append(weakref.ref(entry.value.pipe))
        assert [e.kind for e in events.of(ev.NodeInfo)] == (["evict", "loading", "load"] if i else [])
        assert [p() is not None for p in pipes].count(True) == 1  # the manager freed every evicted pipeline
        # A leak of one tiny model per job would add 50 × ~10 MB; allocator slack stays well below that.
        assert rss() - baseline < 120 * 2**20, f"job {i}: RSS grew by {(rss() - baseline) / 2**20:.0f} MiB"
    ex.models.clear()
    assert ex.models.resident() == [] and all(p() is None for p in pipes)


def test_a_budget_smaller_than_any_model_runs_offloaded_to_disk(
        registry: Registry, demo_dir: Path, tmp_path: Path, reference: dict[str, np.ndarray]) -> None:
    ex = executor(registry, demo_dir, tmp_path, ram_budget="1M")
    events = Recorder()
    np.testing.assert_array_equal(run(ex, SD15, events), reference[SD15])
    [entry] = ex.models.resident()
    assert entry.offloaded and entry.value.offload == "disk"
    offload_dir = Path(entry.value.offload_dir)
    assert any(offload_dir.glob("*.safetensors"))
    assert entry.memory == {}  # weights held in files, a block at a time while sampling
    assert any(e.kind == "load" and "with offloading" in e.message for e in events.of(ev.NodeInfo))

    # A new recipe rebuilds the offloaded model; it gives what an unconstrained model gives.
    unlimited = executor(registry, demo_dir, tmp_path / "u")
    for strength in (0.8, 0.3):
        lora = {**STYLE, "strength": strength}
        expected = run(unlimited, SD15, loras=(lora,))
        np.testing.assert_allclose(run(ex, SD15, loras=(lora,)), expected, atol=1)
    assert not offload_dir.exists()  # the first model's files went with it
    [entry] = ex.models.resident()
    offload_dir = Path(entry.value.offload_dir)
    ex.models.clear()
    assert not offload_dir.exists()


def test_out_of_memory_frees_other_models_and_retries_once(
        registry: Registry, demo_dir: Path, tmp_path: Path, reference: dict[str, np.ndarray],
        monkeypatch: pytest.MonkeyPatch) -> None:
    ex = executor(registry, demo_dir, tmp_path)
    run(ex, SDXL)
    failures = iter([torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")])
    real_sample = samplers.sample

    def flaky(*args: Any, **kwargs: Any) -> Any:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(samplers, "sample", flaky)
    events = Recorder()
    np.testing.assert_array_equal(run(ex, SD15, events), reference[SD15])
    assert [e.name.split(" ")[0] for e in ex.models.resident()] == [SD15]  # SDXL was released for room
    assert any(e.kind == "out_of_memory" for e in events.of(ev.NodeInfo))
    assert len(ex.cache) == 2  # emptied (the checkpoint's recipe went too); then Sample and Show were cached


def test_out_of_memory_twice_is_a_clear_error_and_the_next_job_runs(
        registry: Registry, demo_dir: Path, tmp_path: Path, reference: dict[str, np.ndarray],
        monkeypatch: pytest.MonkeyPatch) -> None:
    ex = executor(registry, demo_dir, tmp_path, ram_budget="64M")
    real_sample = samplers.sample

    def always(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(samplers, "sample", always)
    result = ex.run(graph(SD15, steps=1), Recorder())
    [problem] = result.errors
    assert (result.status, problem.node_id, problem.code) == ("error", "sample", "out_of_memory")
    assert "out of memory on cpu sampling 1× 64×64" in problem.message
    assert "--ram-budget" in problem.message and "57.6 MiB of the 64.0 MiB" in problem.message
    assert "Traceback" not in problem.message
    monkeypatch.setattr(samplers, "sample", real_sample)
    np.testing.assert_array_equal(run(ex, SD15), reference[SD15])


def test_load_events_name_device_and_dtype(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    events = Recorder()
    run(executor(registry, demo_dir, tmp_path), SD15, events)
    [load] = [e for e in events.of(ev.NodeInfo) if e.kind == "load"]
    assert load.message.startswith(f"loaded {SD15} (fp32): ") and load.message.endswith(" on cpu")
    assert load.seconds > 0


def test_auto_dtype_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipelines, "cpu_has_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(pipelines, "cpu_has_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "mps") == torch.float16
    assert resolve_dtype("fp16", "cpu") == torch.float16  # an explicit dtype always wins


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_eviction_moves_to_the_cpu_and_back(registry: Registry, demo_dir: Path, tmp_path: Path,
                                                 sizes: dict[str, int]) -> None:
    settings = Settings(models_dirs=(demo_dir,), output_dir=tmp_path / "out")
    ex = Executor(registry, settings, models=ModelManager(device="cuda", vram_budget=int(max(sizes.values()) * 1.3)))
    first = run(ex, SD15)
    run(ex, SDXL)
    assert {e.name.split(" ")[0]: e.device for e in ex.models.resident()} == {SD15: "cpu", SDXL: "cuda:0"}
    ex.cache.clear()
    events = Recorder()
    np.testing.assert_array_equal(run(ex, SD15, events), first)
    assert "reload" in [e.kind for e in events.of(ev.NodeInfo)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_model_over_budget_runs_with_cpu_offload(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    settings = Settings(models_dirs=(demo_dir,), output_dir=tmp_path / "out")
    ex = Executor(registry, settings, models=ModelManager(device="cuda", vram_budget="4M"))
    run(ex, SD15, loras=(STYLE,))
    [entry] = ex.models.resident()
    assert entry.offloaded and entry.value.offload in ("model", "group")



def test_a_resident_is_measured_again_only_when_it_changed(registry: Registry, demo_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from nodes.engine.resident import Resident

    walks: list[int] = []
    measure = Resident._memory
    monkeypatch.setattr(Resident, "_memory", lambda self: walks.append(1) or measure(self))
    ex = executor(registry, demo_dir, tmp_path)
    run(ex, SD15, loras=(STYLE,))
    first = len(walks)
    ex.cache.clear()
    run(ex, SD15, loras=(STYLE,))  # the same recipe again: every use finds the resident as it was measured
    assert len(walks) == first
    ex.cache.clear()
    run(ex, SD15, loras=({**STYLE, "strength": 0.3},))  # a new recipe: measured again, and right
    assert len(walks) > first
    [entry] = ex.models.resident()
    assert entry.memory == measure(entry.value)
