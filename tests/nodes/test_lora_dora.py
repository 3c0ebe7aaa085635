"""DoRA files (PEFT's `lora_magnitude_vector`, Kohya/LyCORIS `dora_scale`) compute the DoRA reference
m · (W + w·ΔW) / ||W + w·ΔW|| on every layer (Linear and Conv, UNet and text encoder), loaded or fused; a fuse
restores bitwise; DoRA never goes through a hot-swap (diffusers cannot swap its magnitudes)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodes.engine import lora_files, lora_match
from nodes.engine.checkpoints import load_pipeline
from nodes.engine.recipe import Fuse, ModelRecipe
from nodes.engine.reconcile import reconcile
from nodes.engine.resident import Resident
from tests.conftest import Recorder
from tests.nodes import lora_corpus
from tests.nodes.test_hotswap import assert_close, graph, pixels, reconciled
from tests.nodes.test_reconcile import adapter_at

Writer = Callable[[Path], tuple[Path, lora_corpus.Delta, lora_corpus.Magnitudes]]
DORA: dict[str, tuple[str, Writer]] = {  # row of the README table -> (format inspect reports, writer)
    "DoRA, PEFT/diffusers keys": ("peft", lora_corpus.peft_dora),
    "DoRA, kohya/LyCORIS dora_scale": ("kohya", lambda p: lora_corpus.with_dora_scale(lora_corpus.lora(p))),
    "DoRA on LoHa (LyCORIS)": ("loha", lambda p: lora_corpus.with_dora_scale(lora_corpus.loha(p))),
    "DoRA on LoKr (LyCORIS)": ("lokr", lambda p: lora_corpus.with_dora_scale(lora_corpus.lokr(p, "full"))),
}


@pytest.fixture(scope="module")
def base(demo_dir: Path) -> Any:
    return load_pipeline(demo_dir / "checkpoints" / "tiny-sd15")


def _module(pipe: Any, component: str, module: str) -> Any:
    return getattr(pipe, component).get_submodule(module if component == "unet" else module.removeprefix("text_model."))


def _realized(base: Any, demo_dir: Path, path: Path, strength: float, fuse: bool = False) -> Resident:
    root = ModelRecipe(str(demo_dir / "checkpoints" / "tiny-sd15"), "f", "sd15", "fp32")
    resident = Resident.fresh(copy.deepcopy(base), root)
    recipe = root.then(adapter_at(path, "x", strength=strength, te=strength))
    if fuse:
        recipe = recipe.then(Fuse(("x",)))
    reconcile(resident, recipe)
    reconcile(resident, recipe.clip())
    return resident


def _output(layer: Any, weight: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The layer's output on x, or (weight given) what its base layer computes with that weight instead."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    if weight is None:
        with torch.no_grad():
            return layer(x)  # type: ignore[no-any-return]
    if weight.dim() == 2:
        return F.linear(x, weight, base.bias)
    return F.conv2d(x, weight, base.bias, base.stride, base.padding)


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("row", list(DORA))
def test_dora_computes_the_reference_formula(base: Any, demo_dir: Path, tmp_path: Path, row: str,
                                            strength: float) -> None:
    kind, write = DORA[row]
    path, delta, magnitudes = write(tmp_path / "dora.safetensors")
    info = lora_files.inspect(path)
    assert (info.format, info.dora, info.components) == (kind, True, {"unet", "text_encoder"})
    assert lora_match.mismatch(str(path), "1", str(demo_dir / "checkpoints" / "tiny-sd15"), "1") is None
    pipe = _realized(base, demo_dir, path, strength).pipe
    generator = torch.Generator().manual_seed(0)
    for (component, module), d in delta.items():
        original = _module(base, component, module).weight.detach()
        want = lora_corpus.dora_weight(original, d, magnitudes[(component, module)], strength)
        shape = (3, want.shape[1]) if want.dim() == 2 else (1, want.shape[1], 6, 6)
        x = torch.randn(*shape, generator=generator)
        layer = _module(pipe, component, module)
        torch.testing.assert_close(_output(layer, None, x), _output(layer, want, x), atol=2e-5, rtol=1e-4,
                                   msg=lambda m, key=(component, module): f"{key}: {m}")


def test_a_strength_change_in_place_renormalises(base: Any, demo_dir: Path, tmp_path: Path) -> None:
    """A new strength is written into the layers' scalings in place (no reload): DoRA's norm follows it."""
    path, delta, magnitudes = lora_corpus.peft_dora(tmp_path / "dora.safetensors")
    resident = _realized(base, demo_dir, path, 1.0)
    recipe = ModelRecipe(str(demo_dir / "checkpoints" / "tiny-sd15"), "f", "sd15", "fp32").then(
        adapter_at(path, "x", strength=0.3))
    assert reconcile(resident, recipe) == ["scales"]
    generator = torch.Generator().manual_seed(1)
    for module in lora_corpus.UNET:
        original = _module(base, "unet", module).weight.detach()
        want = lora_corpus.dora_weight(original, delta[("unet", module)], magnitudes[("unet", module)], 0.3)
        x = torch.randn(*((3, want.shape[1]) if want.dim() == 2 else (1, want.shape[1], 6, 6)), generator=generator)
        layer = _module(resident.pipe, "unet", module)
        torch.testing.assert_close(_output(layer, None, x), _output(layer, want, x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("row", list(DORA))
def test_dora_fuses_to_the_reference_and_unfuses_bitwise(base: Any, demo_dir: Path, tmp_path: Path,
                                                         row: str) -> None:
    path, delta, magnitudes = DORA[row][1](tmp_path / "dora.safetensors")
    resident = _realized(base, demo_dir, path, 0.75, fuse=True)
    for (component, module), d in delta.items():
        original = _module(base, component, module).weight.detach()
        want = lora_corpus.dora_weight(original, d, magnitudes[(component, module)], 0.75)
        torch.testing.assert_close(_module(resident.pipe, component, module).weight.detach(), want,
                                   atol=2e-5, rtol=1e-4)
    bare = ModelRecipe(str(demo_dir / "checkpoints" / "tiny-sd15"), "f", "sd15", "fp32")
    reconcile(resident, bare)
    reconcile(resident, bare.clip())
    for component, module in delta:
        assert torch.equal(_module(resident.pipe, component, module).weight, _module(base, component, module).weight)


def test_dora_normalised_over_input_channels_is_refused_by_name(tmp_path: Path) -> None:
    path, _, _ = lora_corpus.with_dora_scale(lora_corpus.lora(tmp_path / "old.safetensors"), per_input=True)
    with pytest.raises(lora_files.LoraFileError, match="old.safetensors: .*weight norm over input channels"):
        lora_files.inspect(path)


def _executor(registry: Registry, demo_dir: Path, tmp_path: Path) -> Executor:
    return Executor(registry, Settings(models_dirs=(tmp_path, demo_dir), output_dir=tmp_path / "out"))


def test_hotswap_of_a_dora_file_is_a_validation_error(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "loras").mkdir()
    lora_corpus.peft_dora(tmp_path / "loras" / "dora.safetensors")
    result = _executor(registry, demo_dir, tmp_path).run(graph("tiny-sd15-style", swap="dora"))
    assert result.status == "invalid" and not result.nodes
    assert any((p.node_id, p.input) == ("swap", "lora") and "DoRA" in p.message and "hot-swapped" in p.message
               for p in result.errors), result.errors


def test_hotswap_into_a_dora_slot_fails_naming_it(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "loras").mkdir()
    lora_corpus.with_dora_scale(lora_corpus.lora(tmp_path / "loras" / "dora.safetensors", text=False))
    lora_corpus.lora(tmp_path / "loras" / "plain.safetensors", seed=3, text=False)
    result = _executor(registry, demo_dir, tmp_path).run(graph("dora", swap="plain", rank=4))
    assert result.status == "error"
    assert "DoRA" in str(result.errors) and "dora.safetensors" in str(result.errors)


def test_a_prepared_slot_switches_to_and_from_dora_by_a_load_not_a_swap(registry: Registry, demo_dir: Path,
                                                                         tmp_path: Path) -> None:
    """In a pipeline prepared for hot-swap, another file in the same slot is realized in place (the LoRA
    cache's copy of lora_A/lora_B, or diffusers' hot-swap): for DoRA that would keep the slot's old magnitudes
    (or fail half way), so a switch to, between or from DoRA files is a delete and a load, with the image of a
    fresh pipeline."""
    (tmp_path / "loras").mkdir()
    lora_corpus.with_dora_scale(lora_corpus.lora(tmp_path / "loras" / "dora.safetensors", text=False))
    lora_corpus.with_dora_scale(lora_corpus.lora(tmp_path / "loras" / "dora2.safetensors", seed=5, text=False),
                                seed=13)
    lora_corpus.lora(tmp_path / "loras" / "plain.safetensors", seed=3, text=False)
    lora_corpus.lora(tmp_path / "loras" / "plain2.safetensors", seed=4, text=False)
    executor = _executor(registry, demo_dir, tmp_path)
    pixels(executor, graph("plain", swap="plain2", rank=4))  # slot s prepared for hot-swap at rank 4
    for name in ("dora", "dora2", "plain"):
        events = Recorder()
        switched = pixels(executor, graph(name), events)
        assert reconciled(events) == ["model: delete:s, load:s, scales"], name
        assert_close(switched, pixels(_executor(registry, demo_dir, tmp_path), graph(name)))


@pytest.mark.parametrize("node, inputs, input_name", [("MergeLoRA", {"method": "cat", "slot": "ab"}, "slots"),
                                                      ("SaveLoRA", {"slot": "s", "filename_prefix": "out"}, "slot")])
def test_merge_and_save_refuse_a_dora_slot_naming_it(registry: Registry, demo_dir: Path, tmp_path: Path, node: str,
                                                     inputs: dict[str, Any], input_name: str) -> None:
    """Both write plain LoRA layers: a DoRA slot would lose its magnitudes, so it is refused."""
    (tmp_path / "loras").mkdir()
    lora_corpus.peft_dora(tmp_path / "loras" / "dora.safetensors")
    wf = graph("dora")
    wf["nodes"]["tool"] = {"type": node, "inputs": {"model": ["lora", 0], **inputs}}
    if node == "MergeLoRA":
        wf["nodes"]["sample"]["inputs"]["model"] = ["tool", 0]
    else:
        wf["nodes"] = {k: v for k, v in wf["nodes"].items() if k not in ("sample", "show")}
    result = _executor(registry, demo_dir, tmp_path).run(wf)
    assert [(e.node_id, e.input, e.code) for e in result.errors] == [("tool", input_name, "unsupported_format")]
    assert "dora.safetensors, a DoRA LoRA" in result.errors[0].message
    assert not (tmp_path / "loras" / "out.safetensors").exists()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_kohya_dora_on_flux_or_sd3_is_refused_before_loading(tmp_path: Path, family: str) -> None:
    """diffusers' own SD3/Flux conversions drop dora_scale: a validation error (LoadLoRA's fit check reads
    `lora_files.layers`), not an image without magnitudes."""
    path = lora_corpus.fake(tmp_path / "flux.safetensors", "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight",
                            "lora_unet_double_blocks_0_img_attn_qkv.dora_scale")
    with pytest.raises(lora_files.LoraFileError, match=f"flux.safetensors: DoRA .* SDXL only, not on {family}"):
        lora_files.layers(str(path), "1", family)


def test_diffusers_cannot_hot_swap_dora_the_reason_hotswaplora_refuses_it(base: Any, tmp_path: Path) -> None:
    """diffusers 0.42 maps only lora_A/lora_B keys to the adapter's name for PEFT's hot-swap, which then fails
    on the first magnitude. If this starts passing, HotswapLoRA could accept DoRA (with a test of the result)."""
    from safetensors.torch import load_file

    pipe = copy.deepcopy(base)
    files = [lora_corpus.peft_dora(tmp_path / f"{seed}.safetensors", seed=seed)[0] for seed in (1, 5)]
    first, second = ({k: v for k, v in load_file(p).items() if k.startswith("unet.")} for p in files)
    pipe.load_lora_into_unet(first, network_alphas=None, unet=pipe.unet, adapter_name="a")
    with pytest.raises(KeyError, match="lora_magnitude_vector"):
        pipe.load_lora_into_unet(second, network_alphas=None, unet=pipe.unet, adapter_name="a", hotswap=True)
