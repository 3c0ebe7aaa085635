"""The resident LoRA cache and the in-place switches built on it (nodes/engine/lora_cache.py, reconcile.py).

A switch from the cache must leave the slot exactly as diffusers' own hot-swap leaves it (bitwise: weights and
scalings), and the pipeline computing what a fresh load computes; a strength change must write scales without
walking modules or calling diffusers; files are read once, re-read when they change, bounded by bytes.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft.tuners.lora import LoraLayer

from nodes.engine import lora_cache, reconcile
from nodes.engine.checkpoints import load_pipeline
from nodes.engine.lora_cache import LoraCache
from nodes.engine.recipe import ModelRecipe
from nodes.engine.reconcile import peft_name
from nodes.engine.resident import Resident
from tests.nodes import lora_fixtures
from tests.nodes.test_reconcile import adapter, adapter_at, apply, assert_realizes, new_resident


@pytest.fixture(scope="module")
def base(demo_dir: Path) -> Any:
    pipe = load_pipeline(demo_dir / "checkpoints" / "tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch) -> LoraCache:
    fresh = LoraCache()
    monkeypatch.setattr(lora_cache, "CACHE", fresh)
    return fresh


def root_of(demo_dir: Path) -> ModelRecipe:
    return ModelRecipe(str(demo_dir / "checkpoints" / "tiny-sd15"), "f", "sd15", "fp32")


def slot_state(resident: Resident, slot: str) -> dict[str, torch.Tensor]:
    """Every tensor of a slot's adapter in the UNet, and its scalings, by name."""
    name, out = peft_name(slot), {}
    for module_name, module in resident.pipe.unet.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            out[f"{module_name}.A"] = module.lora_A[name].weight.detach().clone()
            out[f"{module_name}.B"] = module.lora_B[name].weight.detach().clone()
            out[f"{module_name}.scaling"] = torch.as_tensor(module.scaling[name]).clone()
    return out


@pytest.mark.parametrize("first, second", [("tiny-sd15-style", "tiny-sd15-kohya"),
                                           ("tiny-sd15-kohya", "tiny-sd15-subset"),
                                           ("tiny-sd15-style", "tiny-sd15-alpha"),
                                           ("tiny-sd15-rank8", "tiny-sd15-rank2")])
def test_a_cached_switch_leaves_the_slot_as_diffusers_hot_swap_does(base: Any, demo_dir: Path, cache: LoraCache,
                                                                    first: str, second: str) -> None:
    root = root_of(demo_dir)
    ours = new_resident(base, root)
    apply(ours, root.then(adapter(demo_dir, first, "s")).prepared_for_hotswap(8))
    theirs = Resident.fresh(copy.deepcopy(ours.pipe), root)
    theirs.parts, theirs.hotswap_rank = copy.deepcopy(ours.parts), ours.hotswap_rank  # the same books
    target = root.then(adapter(demo_dir, second, "s")).prepared_for_hotswap(8)
    assert apply(ours, target) == ["hotswap:s", "scales"]
    assert cache.conversions == 1  # the cache's copy, not diffusers', was used
    reconcile._load(theirs, "unet", target.live()["s"], hotswap=True)  # diffusers' own hot-swap
    got, want = slot_state(ours, "s"), slot_state(theirs, "s")
    assert got.keys() == want.keys()
    for key in want:
        if key.endswith(".scaling"):
            continue  # ours holds base × weight after the switch; diffusers' the base alone
        assert torch.equal(got[key], want[key]), key
    assert ours.parts["unet"].base_scaling["s"] == theirs.parts["unet"].base_scaling["s"]
    assert_realizes(ours, base, target)


def test_switching_back_reads_and_converts_nothing_and_equals_a_fresh_load(base: Any, demo_dir: Path,
                                                                           cache: LoraCache) -> None:
    root = root_of(demo_dir)
    resident = new_resident(base, root)
    one = root.then(adapter(demo_dir, "tiny-sd15-style", "s", 0.7)).prepared_for_hotswap(4)  # rank = the file's
    two = root.then(adapter(demo_dir, "tiny-sd15-subset", "s", 0.7)).prepared_for_hotswap(4)
    apply(resident, one)
    assert apply(resident, two) == ["hotswap:s", "scales"]
    assert apply(resident, one) == ["hotswap:s", "scales"]
    reads, conversions = cache.reads, cache.conversions
    for recipe in (two, one, two):
        assert apply(resident, recipe) == ["hotswap:s", "scales"]
        assert_realizes(resident, base, recipe)  # the cached tensors were never written through the slot
    assert (cache.reads, cache.conversions) == (reads, conversions)


def test_a_file_changed_on_disk_is_read_again(base: Any, demo_dir: Path, cache: LoraCache, tmp_path: Path) -> None:
    root = root_of(demo_dir)
    path = tmp_path / "mine.safetensors"
    shutil.copy(demo_dir / "loras" / "tiny-sd15-style.safetensors", path)
    resident = new_resident(base, root)
    old = root.then(adapter_at(path, "s")).prepared_for_hotswap(8)
    other = root.then(adapter(demo_dir, "tiny-sd15-subset", "s")).prepared_for_hotswap(8)
    apply(resident, old)
    apply(resident, other)
    apply(resident, old)
    tensors, metadata = lora_fixtures.read(demo_dir / "loras" / "tiny-sd15-rank2.safetensors")
    lora_fixtures.save_file(tensors, path, metadata=metadata)  # same path, new content, size and mtime
    apply(resident, other)
    new = root.then(adapter_at(path, "s")).prepared_for_hotswap(8)
    assert new.live()["s"].fingerprint != old.live()["s"].fingerprint
    assert apply(resident, new) == ["hotswap:s", "scales"]
    assert_realizes(resident, base, new)


def test_a_strength_change_walks_no_modules_and_calls_no_diffusers(base: Any, demo_dir: Path, cache: LoraCache,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = root_of(demo_dir)
    resident = new_resident(base, root)
    stack = root.then(adapter(demo_dir, "tiny-sd15-te", "a", 0.8, 0.5)).then(adapter(demo_dir, "tiny-sd15-kohya", "b"))
    apply(resident, stack)
    apply(resident, stack)
    one = root.then(adapter(demo_dir, "tiny-sd15-te", "a", -0.4, 0.9)).then(
        adapter(demo_dir, "tiny-sd15-kohya", "b", 1.0, 1.0, '{"down": 0.5}'))
    apply(resident, one)  # the first in-place change finds the slots' layers once

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("walked the modules or called diffusers")

    monkeypatch.setattr(reconcile, "_lora_layers", forbidden)
    monkeypatch.setattr(reconcile, "_activate", forbidden)
    for strengths in ((0.3, 1.2, 2.0), (1.0, 0.0, 1.0)):
        recipe = root.then(adapter(demo_dir, "tiny-sd15-te", "a", strengths[0], strengths[1])).then(
            adapter(demo_dir, "tiny-sd15-kohya", "b", strengths[2], 1.0, '{"down": 0.5}'))
        assert apply(resident, recipe) == ["scales"]
        monkeypatch.undo()
        assert_realizes(resident, base, recipe)
        monkeypatch.setattr(lora_cache, "CACHE", cache)
        monkeypatch.setattr(reconcile, "_lora_layers", forbidden)
        monkeypatch.setattr(reconcile, "_activate", forbidden)


def test_the_cache_keeps_to_its_byte_budget_dropping_the_least_recently_used(demo_dir: Path) -> None:
    loras = demo_dir / "loras"
    paths = [str(loras / f"{name}.safetensors") for name in ("tiny-sd15-style", "tiny-sd15-kohya", "tiny-sd15-te")]
    sizes = [sum(t.numel() * t.element_size() for t in LoraCache().read(p, "x").state.values()) for p in paths]
    budget = sizes[0] + sizes[2] + 1  # room for two of the three: style and te, not kohya as well
    cache = LoraCache(budget)
    cache.read(paths[0], "x")
    cache.read(paths[1], "x")
    cache.read(paths[0], "x")  # used again: now the most recent
    cache.read(paths[2], "x")
    assert cache.bytes <= budget
    reads = cache.reads
    cache.read(paths[0], "x")
    assert cache.reads == reads  # kept
    cache.read(paths[1], "x")
    assert cache.reads == reads + 1  # dropped for the te file, read again


def test_prewarm_reads_files_ahead_on_a_thread(demo_dir: Path) -> None:
    cache = LoraCache()
    paths = [(str(demo_dir / "loras" / f"{name}.safetensors"), "x") for name in ("tiny-sd15-style", "tiny-sd15-kohya")]
    for future in cache.prewarm(paths):
        future.result(timeout=60)
    assert cache.reads == 2
    cache.read(*paths[0])
    cache.read(*paths[1])
    assert cache.reads == 2
    assert cache.prewarm(paths) == []  # already there: nothing to do


def test_a_lora_sweep_reads_its_files_into_the_cache_before_any_job_runs(demo_settings: Any, demo_dir: Path,
                                                                        cache: LoraCache) -> None:
    from nodegraph.cache import file_fingerprint
    from nodes.lora import HotswapLoRA, LoadLoRA

    names = ["tiny-sd15-style.safetensors", "tiny-sd15-kohya.safetensors"]
    HotswapLoRA.prepare_sweep("lora", names, {"hotswap_rank": 0}, demo_settings)
    LoadLoRA.prepare_sweep("lora", [names[0], "tiny-sd15-subset.safetensors"], {}, demo_settings)
    LoadLoRA.prepare_sweep("strength", [0.5, 1.0], {}, demo_settings)  # not a file: nothing to read
    cache.wait()
    assert cache.reads == 3
    for name in [*names, "tiny-sd15-subset.safetensors"]:
        path = demo_dir / "loras" / name
        cache.read(str(path), file_fingerprint(path))  # the key a recipe's adapter will have
    assert cache.reads == 3


# ---------------------------------------------------------------------------------------------- SD3 and Flux slots

def denoiser_slot_state(pipe: Any, slot: str) -> dict[str, torch.Tensor]:
    """Every lora_A/lora_B tensor of a slot's adapter in the transformer, by name."""
    name, out = peft_name(slot), {}
    for module_name, module in pipe.transformer.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            out[f"{module_name}.A"] = module.lora_A[name].weight.detach().clone()
            out[f"{module_name}.B"] = module.lora_B[name].weight.detach().clone()
    return out


def other_sd3_lora(demo_dir: Path, tmp_path: Path) -> Path:
    """A second SD3 file for the slot: the demo's, its tensors changed (half its layers, the rest doubled)."""
    tensors, metadata = lora_fixtures.read(demo_dir / "loras" / "tiny-sd3-style.safetensors")
    kept = sorted({k.split(".lora_")[0] for k in tensors})[::2]
    changed = {k: v * 2 for k, v in tensors.items() if k.split(".lora_")[0] in kept}
    path = tmp_path / "tiny-sd3-other.safetensors"
    lora_fixtures.save_file(changed, path, metadata=metadata)
    return path


@pytest.mark.parametrize("family, first, second", [("flux", "tiny-flux-style", "tiny-flux-subset"),
                                                   ("flux", "tiny-flux-rank8", "tiny-flux-style"),
                                                   ("sd3", "tiny-sd3-style", "other")])
def test_a_cached_transformer_switch_copies_what_diffusers_hot_swap_does_and_computes_a_fresh_load(
        demo_dir: Path, cache: LoraCache, tmp_path: Path, family: str, first: str, second: str) -> None:
    from tests.nodes.test_transformers import flux_fresh, flux_signature

    pipe = load_pipeline(demo_dir / "checkpoints" / f"tiny-{family}")
    pipe.set_progress_bar_config(disable=True)
    root = ModelRecipe(str(demo_dir / "checkpoints" / f"tiny-{family}"), "f", family, "fp32")
    ours = Resident.fresh(copy.deepcopy(pipe), root)
    # (at 1.0: PEFT's hot-swap leaves the scaling of layers the new file lacks as it was, base × weight; ours keeps
    # the base; both are zeroed layers, so the same only at 1.0)
    reconcile.reconcile(ours, root.then(adapter(demo_dir, first, "s")).prepared_for_hotswap(8))
    theirs = Resident.fresh(copy.deepcopy(ours.pipe), root)
    theirs.parts, theirs.hotswap_rank = copy.deepcopy(ours.parts), ours.hotswap_rank
    other = other_sd3_lora(demo_dir, tmp_path) if second == "other" else demo_dir / "loras" / f"{second}.safetensors"
    target = root.then(adapter_at(other, "s", 0.8)).prepared_for_hotswap(8)
    conversions = cache.conversions
    assert reconcile.reconcile(ours, target) == ["hotswap:s", "scales"]
    assert cache.conversions == conversions + 1  # the cache's slot-ready copy, not diffusers' hot-swap
    reconcile._load(theirs, "unet", target.live()["s"], hotswap=True)  # diffusers' own
    got, want = denoiser_slot_state(ours.pipe, "s"), denoiser_slot_state(theirs.pipe, "s")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert ours.parts["unet"].base_scaling["s"] == theirs.parts["unet"].base_scaling["s"]
    if family == "flux":  # the output equals a fresh load's, and switching back reads and converts nothing
        torch.testing.assert_close(flux_signature(ours.pipe), flux_signature(flux_fresh(pipe, target)), atol=1e-5,
                                   rtol=0)
        back = root.then(adapter(demo_dir, first, "s", 0.8)).prepared_for_hotswap(8)
        reconcile.reconcile(ours, back)
        reads, conversions = cache.reads, cache.conversions
        for recipe in (target, back):
            assert reconcile.reconcile(ours, recipe) == ["hotswap:s", "scales"]
            torch.testing.assert_close(flux_signature(ours.pipe), flux_signature(flux_fresh(pipe, recipe)),
                                       atol=1e-5, rtol=0)
        assert (cache.reads, cache.conversions) == (reads, conversions)
