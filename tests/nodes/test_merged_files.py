"""MergeLoRA's files have a bounded lifetime: least recently used first, never one a resident pipeline
holds, and a cached merge whose file was removed runs again (nodes/engine/merged_files.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from nodegraph.cache import Entry, OutputCache
from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodes.engine import merged_files
from tests.conftest import workflow


def _file(folder: Path, name: str, size: int, used: float) -> Path:
    path = folder / f"merged-{name}.safetensors"
    path.write_bytes(b"x" * size)
    os.utime(path, (used, 1_000_000.0))
    return path


def test_prune_deletes_least_recently_used_first_within_count_and_bytes(tmp_path: Path) -> None:
    a, b, c, d = (_file(tmp_path, n, 100, used) for n, used in (("a", 10), ("b", 20), ("c", 30), ("d", 40)))
    (tmp_path / "other.safetensors").write_bytes(b"y")  # not a merge: never touched
    assert merged_files.prune(tmp_path, keep={str(a)}, max_files=2, max_bytes=10_000) == [b, c]
    assert a.exists() and d.exists() and (tmp_path / "other.safetensors").exists()
    assert merged_files.prune(tmp_path, keep=(), max_files=10, max_bytes=150) == [a]
    assert [p.name for p in tmp_path.glob("merged-*")] == [d.name]


def test_touch_orders_by_use_and_keeps_the_modification_time(tmp_path: Path) -> None:
    old, new = _file(tmp_path, "old", 10, 10), _file(tmp_path, "new", 10, 20)
    merged_files.touch(old)
    assert old.stat().st_mtime == 1_000_000.0
    assert merged_files.prune(tmp_path, keep=(), max_files=1, max_bytes=10_000) == [new]


def test_a_cached_output_whose_needed_file_is_gone_is_not_used(tmp_path: Path) -> None:
    needed = tmp_path / "f"
    needed.write_text("1")
    cache = OutputCache()
    cache.put("k", Entry({"x": 1}, needs=(str(needed),)))
    assert cache.get("k") is not None
    needed.unlink()
    assert cache.get("k") is None


def _graph(weights: str, sample: bool) -> dict[str, Any]:
    nodes: dict[str, Any] = {
        "ckpt": {"type": "LoadCheckpoint", "inputs": {"checkpoint": "tiny-sd15", "dtype": "fp32"}},
        "a": {"type": "LoadLoRA", "inputs": {"model": ["ckpt", 0], "lora": "tiny-sd15-style.safetensors",
                                              "slot": "a"}},
        "b": {"type": "LoadLoRA", "inputs": {"model": ["a", 0], "lora": "tiny-sd15-rank8.safetensors",
                                              "slot": "b"}},
        "merge": {"type": "MergeLoRA", "inputs": {"model": ["b", 0], "method": "cat", "weights": weights}}}
    if sample:
        nodes["sample"] = {"type": "Sample", "inputs": {"model": ["merge", 0], "prompt": "a castle", "seed": 4,
                                                        "steps": 2, "width": 64, "height": 64,
                                                        "sampler_name": "euler"}}
    nodes["show"] = {"type": "Show", "inputs": {"value": ["sample" if sample else "merge", 0]}}
    return workflow(nodes)


def _run(executor: Executor, weights: str, sample: bool) -> tuple[Path, str]:
    result = executor.run(_graph(weights, sample))
    assert result.status == "ok", result.errors
    return Path(result.nodes["merge"].outputs["model"].live()["merged"].path), result.nodes["merge"].status


def test_merges_beyond_the_bound_are_deleted_but_never_a_resident_slots_and_a_pruned_merge_runs_again(
        registry: Registry, demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODEGRAPH_MERGED_FILES", "1")
    executor = Executor(registry, Settings(models_dirs=(tmp_path, demo_dir), output_dir=tmp_path / "out"))
    first, _ = _run(executor, "1, 1", sample=True)  # the resident pipeline now holds the first merge
    second, _ = _run(executor, "0.5, 0.5", sample=False)
    assert first.exists() and second.exists()  # over the bound, but the first is resident and the second new
    third, _ = _run(executor, "0.2, 0.2", sample=True)
    assert first.exists() and third.exists() and not second.exists()  # the least recently used non-resident
    again, status = _run(executor, "0.5, 0.5", sample=False)  # cached, but its file is gone: it runs again
    assert (again, status) == (second, "ran") and second.exists()
    assert not first.exists()  # no longer resident (the third is): pruned when the second came back
    assert _run(executor, "0.5, 0.5", sample=False) == (second, "cached")
