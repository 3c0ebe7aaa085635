"""The reconciler's invariant, over random sequences of recipes on the demo SD1.5 model.

After every transition the pipeline must compute what a fresh pipeline built from the recipe
alone computes (built here with plain diffusers calls, not the reconciler), and exactly the
recipe's live adapters must exist on its modules. A failed transition must leave the last good
state. Outputs are compared on one UNet and one text-encoder forward with fixed inputs: cheaper
than a full sample, and it sees every weight the LoRAs touch.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales
from diffusers.utils.peft_utils import set_weights_and_activate_adapters
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from peft.tuners.lora import LoraLayer

from nodegraph.cache import file_fingerprint
from nodes.engine import lora_files
from nodes.engine.checkpoints import load_pipeline
from nodes.engine.recipe import Adapter, Fuse, ModelRecipe
from nodes.engine.reconcile import ReconcileError, peft_name, reconcile
from nodes.engine.resident import Resident
from tests.nodes import lora_fixtures

LORAS = ["tiny-sd15-style", "tiny-sd15-kohya", "tiny-sd15-subset", "tiny-sd15-te", "tiny-sd15-alpha"]
ATOL = 1e-5  # fp32; fusing reorders the same sums, which moves outputs by ~1e-7 here


@pytest.fixture(scope="module")
def base(demo_dir: Path) -> Any:
    pipe = load_pipeline(demo_dir / "checkpoints" / "tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def resident(base: Any, demo_dir: Path) -> Resident:
    return new_resident(base, ModelRecipe(str(demo_dir / "checkpoints" / "tiny-sd15"), "f", "sd15", "fp32"))


def adapter(demo_dir: Path, name: str, slot: str, strength: float = 1.0, te: float = 1.0, blocks: str = "") -> Adapter:
    return adapter_at(demo_dir / "loras" / f"{name}.safetensors", slot, strength, te, blocks)


def adapter_at(path: Path, slot: str, strength: float = 1.0, te: float = 1.0, blocks: str = "") -> Adapter:
    info = lora_files.inspect(path)
    return Adapter(slot, str(path), file_fingerprint(path), strength, te, blocks, tuple(sorted(info.components)),
                   info.max_rank)


def unet_weight(pipe: Any, a: Adapter) -> Any:
    """The adapter's UNet weight for diffusers: block scales filled out with 1.0 by diffusers' own expansion,
    then every number multiplied by the strength (parts left out are scaled too)."""
    if not a.block_scales:
        return a.strength
    expanded = _maybe_expand_lora_scales(pipe.unet, [json.loads(a.block_scales)], default_scale=1.0)[0]
    return {key: value * a.strength for key, value in expanded.items()}


def apply_weights(pipe: Any, adapters: list[Adapter]) -> None:
    """Activate adapters at their recipe weights with plain diffusers calls."""
    names = [a.slot for a in adapters]
    pipe.set_adapters(names, [{"unet": 1.0, **({"text_encoder": a.te_strength} if "text_encoder" in a.components
                                               else {})} for a in adapters])
    set_weights_and_activate_adapters(pipe.unet, names, [unet_weight(pipe, a) for a in adapters])


def fresh(base: Any, recipe: ModelRecipe) -> Any:
    """The recipe realized on a copy of the untouched pipeline with plain diffusers calls."""
    pipe = copy.deepcopy(base)
    for group, scale in recipe.fused_groups():
        for a in group:
            pipe.load_lora_weights(a.path, adapter_name=a.slot)
        apply_weights(pipe, list(group))
        pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=scale, adapter_names=[a.slot for a in group])
        pipe.unload_lora_weights()
    live = list(recipe.live().values())
    for a in live:
        pipe.load_lora_weights(a.path, adapter_name=a.slot)
    if live:
        apply_weights(pipe, live)
    return pipe


@torch.no_grad()
def signature(pipe: Any) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, 32, generator=gen)
    ids = torch.arange(3, 80).unsqueeze(0) % 300
    unet = pipe.unet(latents, 10, encoder_hidden_states=context).sample
    text = pipe.text_encoder(ids)[0]
    return unet, text


def adapters_on(pipe: Any) -> set[str]:
    names: set[str] = set()
    for model in (pipe.unet, pipe.text_encoder):
        for module in model.modules():
            if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
                names.update(module.lora_A.keys())
    return names


def slots(recipe: ModelRecipe) -> set[str]:
    return {peft_name(slot) for slot in recipe.live()}


def assert_realizes(resident: Resident, base: Any, recipe: ModelRecipe) -> None:
    assert_same(signature(resident.pipe), signature(fresh(base, recipe)))
    assert adapters_on(resident.pipe) == slots(recipe)
    assert resident.applied == recipe


def assert_same(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    for part, g, w in zip(("unet", "text encoder"), got, want, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0, msg=lambda m, part=part: f"{part}: {m}")


def new_resident(base: Any, root: ModelRecipe, prepared: int = 0) -> Resident:
    """A resident on a fresh copy of the pipeline; `prepared` > 0: one that once served a hot-swap recipe."""
    resident = Resident.fresh(copy.deepcopy(base), root)
    if prepared:
        apply(resident, root.prepared_for_hotswap(prepared))
        apply(resident, root)  # the preparation stays: it is not undone by a recipe without it
    return resident


def apply(resident: Resident, recipe: ModelRecipe) -> list[str]:
    """Reconcile both parts to a one-recipe model, as Sample does; returns the denoiser's actions."""
    actions = reconcile(resident, recipe)
    reconcile(resident, recipe.clip())
    return actions


STRENGTHS = st.sampled_from([1.0, 0.5, -0.7, 1.3, 0.0])
BLOCKS = st.sampled_from(["", '{"down": 0.2, "up": {"block_0": [0.5, 1.0, 0.0]}}', '{"mid": 0.0}',
                          '{"up": 0.0, "down": {"block_1": [2.0, -1.0]}}'])
LOAD = st.tuples(st.just("load"), st.sampled_from(LORAS), st.sampled_from("abc"), STRENGTHS, STRENGTHS, BLOCKS)
FUSE = st.tuples(st.just("fuse"), st.sampled_from([0.5, 1.0]))
# Edits a user makes to a workflow between runs: a strength, a file, a new or removed LoRA, a fuse.
EDITS = st.one_of(
    st.tuples(st.just("strength"), st.integers(0, 5), STRENGTHS),
    st.tuples(st.just("file"), st.integers(0, 5), st.sampled_from(LORAS)),
    st.tuples(st.just("blocks"), st.integers(0, 5), BLOCKS),
    st.tuples(st.just("add"), st.integers(0, 5), st.one_of(LOAD, LOAD, FUSE)),
    st.tuples(st.just("remove"), st.integers(0, 5)),
    st.tuples(st.just("add"), st.integers(0, 5), st.just(("hotswap", 8))),
)


def edit(ops: list[Any], change: Any) -> list[Any]:
    ops = list(ops)
    kind, index = change[0], change[1]
    if kind == "add":
        ops.insert(min(index, len(ops)), change[2])
    elif index < len(ops) and kind == "remove":
        del ops[index]
    elif index < len(ops) and ops[index][0] == "load":
        field = {"strength": 3, "file": 1, "blocks": 5}[kind]
        ops[index] = (*ops[index][:field], change[2], *ops[index][field + 1 :])
    return ops


def build(demo_dir: Path, root: ModelRecipe, ops: list[Any]) -> ModelRecipe:
    """A recipe from ops, keeping the rules LoadLoRA and FuseLoRA enforce (free slot, something to fuse)."""
    recipe = root
    for op in ops:
        if op[0] == "load" and op[2] not in recipe.live():
            recipe = recipe.then(adapter(demo_dir, op[1], op[2], op[3], op[4], op[5]))
        elif op[0] == "fuse" and recipe.live():
            recipe = recipe.then(Fuse(tuple(recipe.live()), op[1]))
    if ("hotswap", 8) in ops:  # prepared for hot-swap: a changed file in a slot is swapped in place
        recipe = recipe.prepared_for_hotswap(8)
    return recipe


# Each example starts from a fresh copy of the pipeline (so a failure replays alone), possibly prepared for
# hot-swap by an earlier recipe: the history a long-lived resident brings, which must not change any output.
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([0, 0, 8]), st.lists(LOAD, max_size=3), st.lists(EDITS, min_size=1, max_size=5))
def test_any_sequence_of_edits_reconciles_to_the_fresh_result(
    base: Any, demo_dir: Path, prepared: int, ops: list[Any], edits: list[Any]
) -> None:
    root = ModelRecipe(str(demo_dir / "checkpoints" / "tiny-sd15"), "f", "sd15", "fp32")
    resident = new_resident(base, root, prepared)
    for change in [None, *edits]:
        ops = edit(ops, change) if change else ops
        recipe = build(demo_dir, root, ops)
        note(f"{recipe.summary()} (hot-swap rank {recipe.hotswap_rank}): {apply(resident, recipe)}")
        assert_realizes(resident, base, recipe)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([0, 8]), st.lists(st.lists(st.one_of(LOAD, LOAD, FUSE), max_size=3), min_size=2, max_size=4))
def test_one_resident_equals_a_fresh_resident_per_recipe(
    base: Any, demo_dir: Path, prepared: int, recipes: list[list[Any]]
) -> None:
    """Any sequence of recipes on one resident gives what each recipe gives on a resident of its own."""
    root = ModelRecipe(str(demo_dir / "checkpoints" / "tiny-sd15"), "f", "sd15", "fp32")
    resident = new_resident(base, root, prepared)
    for ops in recipes:
        recipe = build(demo_dir, root, ops)
        note(f"{recipe.summary()}: {apply(resident, recipe)}")
        alone = new_resident(base, root)
        apply(alone, recipe)
        assert_same(signature(resident.pipe), signature(alone.pipe))


def test_strength_change_is_set_adapters_only(resident: Resident, demo_dir: Path) -> None:
    root = resident.applied.bare()
    one = root.then(adapter(demo_dir, "tiny-sd15-style", "a", 1.0))
    apply(resident, one)
    assert apply(resident, root.then(adapter(demo_dir, "tiny-sd15-style", "a", 0.4))) == ["scales"]
    both = root.then(adapter(demo_dir, "tiny-sd15-style", "a", 0.4)).then(adapter(demo_dir, "tiny-sd15-kohya", "b"))
    assert apply(resident, both) == ["load:b", "scales"]
    assert apply(resident, both) == []
    assert apply(resident, root.then(adapter(demo_dir, "tiny-sd15-kohya", "b"))) == ["delete:a", "scales"]


def test_unfused_weights_come_back_bitwise(resident: Resident, demo_dir: Path) -> None:
    root = resident.applied.bare()
    apply(resident, root)
    before = {k: v.clone() for k, v in resident.pipe.unet.state_dict().items()}
    fused = root.then(adapter(demo_dir, "tiny-sd15-te", "a", 0.8)).then(Fuse(("a",), 0.7))
    assert apply(resident, fused) == ["fuse"]
    changed = [k for k, v in resident.pipe.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # the fuse really changed the weights
    assert apply(resident, root) == ["restore_base"]
    after = resident.pipe.unet.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_failed_transition_keeps_the_last_good_state(resident: Resident, base: Any, demo_dir: Path) -> None:
    root = resident.applied.bare()
    good = root.then(adapter(demo_dir, "tiny-sd15-style", "a", 0.6))
    apply(resident, good)
    wrong_model = adapter(demo_dir, "tiny-sdxl-style", "b")  # a LoRA for another architecture
    with pytest.raises(ReconcileError, match="tiny-sdxl-style.safetensors"):
        apply(resident, good.then(wrong_model))
    assert not resident.broken
    assert_realizes(resident, base, good)
    after = good.then(adapter(demo_dir, "tiny-sd15-kohya", "b"))
    apply(resident, after)  # the next run works
    assert_realizes(resident, base, after)




# Regressions: each sequence below once left the pipeline other than a fresh build of its recipe.


def test_hot_swap_out_of_a_text_encoder_lora_leaves_no_text_encoder_layers(resident: Resident, base: Any,
                                                                           demo_dir: Path) -> None:
    root = resident.applied.bare()
    one = root.then(adapter(demo_dir, "tiny-sd15-te", "a")).prepared_for_hotswap(8)
    apply(resident, one)
    two = root.then(adapter(demo_dir, "tiny-sd15-style", "a")).prepared_for_hotswap(8)
    assert "hotswap:a" in apply(resident, two)
    assert_realizes(resident, base, two)


def test_text_encoder_only_lora_on_a_resident_prepared_for_hot_swap(base: Any, demo_dir: Path,
                                                                    tmp_path: Path) -> None:
    path = lora_fixtures.text_encoder_only(demo_dir, tmp_path / "te-only.safetensors")
    root = ModelRecipe(str(demo_dir / "checkpoints" / "tiny-sd15"), "f", "sd15", "fp32")
    resident = new_resident(base, root, prepared=8)
    recipe = root.then(adapter_at(path, "t", 1.0, 0.6))
    apply(resident, recipe)
    assert_realizes(resident, base, recipe)


def test_training_script_layout_honours_the_text_encoder_strength(resident: Resident, base: Any, demo_dir: Path,
                                                                  tmp_path: Path) -> None:
    path = lora_fixtures.training_script_layout(demo_dir, tmp_path / "old.safetensors")
    root = resident.applied.bare()
    for te in (0.5, 0.0):
        recipe = root.then(adapter_at(path, "a", 0.8, te))
        apply(resident, recipe)
        assert_realizes(resident, base, recipe)
    # text-encoder strength 0: no LoRA there
    torch.testing.assert_close(signature(resident.pipe)[1], signature(base)[1], atol=ATOL, rtol=0)


def test_strength_zero_with_block_scales_is_no_lora(resident: Resident, base: Any, demo_dir: Path) -> None:
    recipe = resident.applied.bare().then(adapter(demo_dir, "tiny-sd15-style", "a", 0.0, 1.0, '{"mid": 0.0}'))
    apply(resident, recipe)
    assert_same(signature(resident.pipe), signature(base))


def test_block_scales_multiply_the_strength_everywhere_conv_in_included(resident: Resident, base: Any,
                                                                         tmp_path: Path) -> None:
    path = lora_fixtures.with_conv_in(base.unet, tmp_path / "conv.safetensors")
    apply(resident, resident.applied.bare().then(adapter_at(path, "a", 0.8, 1.0, '{"down": 0.5}')))
    want = copy.deepcopy(base)
    want.load_lora_weights(str(path), adapter_name="a")
    for name, module in want.unet.named_modules():
        if isinstance(module, LoraLayer):  # conv_in is outside every block: the strength alone
            module.set_scale("a", 0.8 * (0.5 if name.startswith("down_blocks") else 1.0))
    assert_same(signature(resident.pipe), signature(want))


def test_a_library_warning_while_loading_fails_the_transition(resident: Resident, base: Any, demo_dir: Path,
                                                              tmp_path: Path) -> None:
    tensors, metadata = lora_fixtures.read(demo_dir / "loras" / "tiny-sd15-style.safetensors")
    tensors["unet.nowhere.lora_A.weight"] = torch.zeros(4, 4)
    tensors["unet.nowhere.lora_B.weight"] = torch.zeros(4, 4)
    path = tmp_path / "extra.safetensors"
    lora_fixtures.save_file(tensors, path, metadata=metadata)
    good = resident.applied.bare().then(adapter(demo_dir, "tiny-sd15-kohya", "k"))
    apply(resident, good)
    with pytest.raises(ReconcileError, match="extra.safetensors"):
        apply(resident, good.then(adapter_at(path, "x")))
    assert_realizes(resident, base, good)


def test_model_and_clip_sides_with_different_stacks_never_undo_each_other(resident: Resident, base: Any,
                                                                          demo_dir: Path) -> None:
    root = resident.applied.bare()
    model = root.then(adapter(demo_dir, "tiny-sd15-te", "a", 0.7, 0.0)).then(adapter(demo_dir, "tiny-sd15-kohya", "b"))
    clip = root.clip().then(adapter(demo_dir, "tiny-sd15-te", "a", 0.0, 0.6))
    assert reconcile(resident, model) == ["load:a", "load:b", "scales"]
    assert reconcile(resident, clip) == ["load:a", "scales"]
    for _ in range(2):  # alternating encode (CLIP) and sample (MODEL) runs: nothing to do
        assert reconcile(resident, model) == [] and reconcile(resident, clip) == []
    unet, _ = signature(resident.pipe)
    _, text = signature(fresh(base, replace(clip, part="unet")))
    assert_same((unet, signature(resident.pipe)[1]), (signature(fresh(base, model))[0], text))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.lists(st.one_of(LOAD, LOAD, FUSE), max_size=3),
                          st.lists(st.one_of(LOAD, LOAD, FUSE), max_size=3)), min_size=1, max_size=3))
def test_model_and_clip_recipes_that_differ_reconcile_each_to_its_own_result(
    base: Any, demo_dir: Path, pairs: list[tuple[list[Any], list[Any]]]
) -> None:
    root = ModelRecipe(str(demo_dir / "checkpoints" / "tiny-sd15"), "f", "sd15", "fp32")
    resident = new_resident(base, root)
    for model_ops, clip_ops in pairs:
        model, clip = build(demo_dir, root, model_ops), build(demo_dir, root, clip_ops).clip()
        note(f"model {model.summary()}: {reconcile(resident, model)}")
        note(f"clip {clip.summary()}: {reconcile(resident, clip)}")
        want = signature(fresh(base, model))[0], signature(fresh(base, replace(clip, part="unet")))[1]
        assert_same(signature(resident.pipe), want)
