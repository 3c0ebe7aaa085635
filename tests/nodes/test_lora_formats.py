"""The format corpus: every LoRA format LoadLoRA accepts gives, once loaded by the reconciler, the ΔW the
format's own definition gives (tests/nodes/lora_corpus.py), on every layer, and fuses to base + ΔW."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft.tuners.lora import LoraLayer

from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodes.engine import lora_files, lora_match
from nodes.engine.checkpoints import load_pipeline
from nodes.engine.recipe import Fuse, ModelRecipe
from nodes.engine.reconcile import peft_name, reconcile
from nodes.engine.resident import Resident
from tests.conftest import Recorder
from tests.nodes import lora_corpus
from tests.nodes.test_hotswap import assert_close, graph, pixels, reconciled
from tests.nodes.test_reconcile import adapter_at

Writer = Callable[[Path], tuple[Path, lora_corpus.Delta]]
CORPUS: dict[str, tuple[str, Writer]] = {  # row of the README table -> (format inspect reports, writer)
    "kohya LoRA/LoCon": ("kohya", lora_corpus.lora),
    "kohya, alpha per layer": ("kohya", lambda p: lora_corpus.lora(p, alpha_step=0.5)),
    "kohya, ldm block names": ("kohya-ldm", lambda p: lora_corpus.lora(p, names="ldm")),
    "ComfyUI ldm layout": ("kohya-ldm", lambda p: lora_corpus.lora(p, names="comfy")),
    "kohya fp16": ("kohya", lambda p: lora_corpus.lora(p, dtype=torch.float16)),
    "kohya bf16": ("kohya", lambda p: lora_corpus.lora(p, dtype=torch.bfloat16)),
    "LoCon Tucker": ("locon-tucker", lora_corpus.locon_tucker),
    "LoHa": ("loha", lora_corpus.loha),
    "LoHa fp16": ("loha", lambda p: lora_corpus.loha(p, dtype=torch.float16)),
    "LoKr": ("lokr", lambda p: lora_corpus.lokr(p, "w2_decomposed")),
    "LoKr full": ("lokr", lambda p: lora_corpus.lokr(p, "full")),
    "LoKr both decomposed": ("lokr", lambda p: lora_corpus.lokr(p, "both_decomposed")),
    "LoHa Tucker": ("loha", lambda p: lora_corpus.loha(p, tucker=True)),
    "LoKr Tucker": ("lokr", lambda p: lora_corpus.lokr(p, "tucker")),
}


@pytest.fixture(scope="module")
def base(demo_dir: Path) -> Any:
    return load_pipeline(demo_dir / "checkpoints" / "tiny-sd15")


def loaded(base: Any, demo_dir: Path, path: Path, fuse: bool = False, family: str = "sd15") -> Resident:
    root = ModelRecipe(str(demo_dir / "checkpoints" / f"tiny-{family}"), "f", family, "fp32")
    resident = Resident.fresh(copy.deepcopy(base), root)
    recipe = root.then(adapter_at(path, "x"))
    if fuse:
        recipe = recipe.then(Fuse(("x",)))
    reconcile(resident, recipe)
    reconcile(resident, recipe.clip())
    return resident


def deltas(pipe: Any) -> dict[tuple[str, str], torch.Tensor]:
    found = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for name, module in getattr(pipe, component, torch.nn.Module()).named_modules():
            if isinstance(module, LoraLayer):
                # transformers 5 CLIP models have no `text_model.` level; the files of every tool do.
                name = name if component == "unet" else f"text_model.{name.removeprefix('text_model.')}"
                found[(component, name)] = module.get_delta_weight(peft_name("x")).detach()
    return found


@pytest.mark.parametrize("row", list(CORPUS))
def test_every_format_loads_with_its_reference_delta(base: Any, demo_dir: Path, tmp_path: Path, row: str) -> None:
    kind, write = CORPUS[row]
    path, want = write(tmp_path / "corpus.safetensors")
    info = lora_files.inspect(path)
    assert info.format == kind and info.components == {"unet", "text_encoder"}
    ckpt = str(demo_dir / "checkpoints" / "tiny-sd15")
    assert lora_match.mismatch(str(path), "1", ckpt, "1") is None
    got = deltas(loaded(base, demo_dir, path).pipe)
    assert set(got) == set(want)
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta, atol=1e-5, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("row", ["LoHa", "LoKr", "LoCon Tucker", "LoHa Tucker", "LoKr Tucker",
                                 "kohya, ldm block names"])
def test_converted_formats_fuse_to_base_plus_delta(base: Any, demo_dir: Path, tmp_path: Path, row: str) -> None:
    path, want = CORPUS[row][1](tmp_path / "corpus.safetensors")
    pipe = loaded(base, demo_dir, path, fuse=True).pipe
    for (component, module), delta in want.items():
        module = module if component == "unet" else module.removeprefix("text_model.")
        original = getattr(base, component).get_submodule(module).weight
        fused = getattr(pipe, component).get_submodule(module).weight
        torch.testing.assert_close(fused - original, delta, atol=1e-5, rtol=1e-4)


def test_inspect_reports_the_rank_of_the_rewritten_lora(tmp_path: Path) -> None:
    assert lora_files.inspect(lora_corpus.loha(tmp_path / "h.safetensors", r1=3, r2=2)[0]).max_rank == 6
    # w1 (8×b) full, w2 = w2a (c×2) w2b: rank b·2, b = 8 for the 64-wide layers.
    assert lora_files.inspect(lora_corpus.lokr(tmp_path / "k.safetensors", "w2_decomposed")[0]).max_rank == 16


@pytest.mark.parametrize("row", ["LoHa", "LoKr", "kohya, ldm block names", "ComfyUI ldm layout"])
def test_a_converted_file_for_another_model_is_a_mismatch_naming_its_layer(demo_dir: Path, tmp_path: Path,
                                                                          row: str) -> None:
    path, _ = CORPUS[row][1](tmp_path / "sd15.safetensors")
    problem = lora_match.mismatch(str(path), "1", str(demo_dir / "checkpoints" / "tiny-sdxl"), "1")
    assert problem is not None and "(sdxl)" in problem and ("unet." in problem or "text_encoder" in problem)


def test_an_sdxl_file_on_sd15_is_a_mismatch(demo_dir: Path, tmp_path: Path) -> None:
    path, _ = lora_corpus.sdxl_kohya_sgm(tmp_path / "sdxl.safetensors")
    problem = lora_match.mismatch(str(path), "1", str(demo_dir / "checkpoints" / "tiny-sd15"), "1")
    assert problem is not None and "tiny-sd15 (sd15)" in problem


@pytest.mark.parametrize("row", ["LoHa", "LoKr"])
def test_hotswap_of_a_loha_or_lokr_is_a_validation_error(registry: Registry, demo_dir: Path, tmp_path: Path,
                                                         row: str) -> None:
    (tmp_path / "loras").mkdir()
    CORPUS[row][1](tmp_path / "loras" / "lyco.safetensors")
    executor = Executor(registry, Settings(models_dirs=(demo_dir, tmp_path), output_dir=tmp_path / "out"))
    result = executor.run(graph("tiny-sd15-style", swap="lyco"))
    assert result.status == "invalid" and not result.nodes
    assert any((p.node_id, p.input) == ("swap", "lora") and f"LyCORIS {row} file, which cannot be hot-swapped"
               in p.message for p in result.errors), result.errors


@pytest.mark.parametrize("swap", ["ldm", "comfy", "tucker"])
def test_converted_formats_hot_swap_in_place_into_a_slot_of_the_same_layers(registry: Registry, demo_dir: Path,
                                                                            tmp_path: Path, swap: str) -> None:
    (tmp_path / "loras").mkdir()
    lora_corpus.lora(tmp_path / "loras" / "first.safetensors", seed=7, text=False)
    if swap == "tucker":
        lora_corpus.locon_tucker(tmp_path / "loras" / "second.safetensors", seed=8, text=False)
    else:
        lora_corpus.lora(tmp_path / "loras" / "second.safetensors", seed=8, names=swap, text=False)
    executor = Executor(registry, Settings(models_dirs=(demo_dir, tmp_path), output_dir=tmp_path / "out"))
    pixels(executor, graph("first", swap="first", rank=4))  # the slot holds the Kohya file, prepared for rank 4
    events = Recorder()
    swapped = pixels(executor, graph("first", swap="second", rank=4), events)
    assert reconciled(events) == ["model: hotswap:s, scales"]
    executor.cache.clear()
    assert_close(swapped, pixels(executor, graph("second")))


def test_sdxl_kohya_file_with_sgm_block_names_loads_with_its_reference_delta(demo_dir: Path, tmp_path: Path) -> None:
    path, want = lora_corpus.sdxl_kohya_sgm(tmp_path / "sdxl.safetensors")
    info = lora_files.inspect(path)
    assert info.format == "kohya-ldm" and info.components == {"unet", "text_encoder", "text_encoder_2"}
    ckpt = str(demo_dir / "checkpoints" / "tiny-sdxl")
    assert lora_match.mismatch(str(path), "1", ckpt, "1") is None
    got = deltas(loaded(load_pipeline(ckpt), demo_dir, path, family="sdxl").pipe)
    assert set(got) == set(want)
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta, atol=1e-5, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
