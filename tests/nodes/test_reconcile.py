"""The reconciler's invariant, over random sequences of recipes on the demo SD1.5 model.

After every transition the pipeline must compute what a fresh pipeline built from the recipe
alone computes (built here with plain diffusers calls, not the reconciler), and exactly the
recipe's live adapters must exist on its modules. A failed transition must leave the last good
state. Outputs are compared on one UNet and one text-encoder forward with fixed inputs: cheaper
than a full sample, and it sees every weight the LoRAs touch.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodegraph.cache import file_fingerprint
from nodes import lora_files
from nodes.checkpoints import load_pipeline
from nodes.recipe import Adapter, Fuse, ModelRecipe
from nodes.reconcile import ReconcileError, Resident, peft_name, reconcile

LORAS = ["tiny-sd15-style", "tiny-sd15-kohya", "tiny-sd15-subset", "tiny-sd15-te", "tiny-sd15-alpha"]
ATOL = 1e-5  # fp32; fusing reorders the same sums, which moves outputs by ~1e-7 here


@pytest.fixture(scope="module")
def base(demo_dir: Path) -> Any:
    pipe = load_pipeline(demo_dir / "checkpoints" / "tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def resident(base: Any, demo_dir: Path) -> Resident:
    path = str(demo_dir / "checkpoints" / "tiny-sd15")
    return Resident(copy.deepcopy(base), ModelRecipe(path, "f", "sd15", "fp32"))


def adapter(demo_dir: Path, name: str, slot: str, strength: float = 1.0, te: float = 1.0, blocks: str = "") -> Adapter:
    path = demo_dir / "loras" / f"{name}.safetensors"
    info = lora_files.inspect(path)
    return Adapter(slot, str(path), file_fingerprint(path), strength, te, blocks, tuple(sorted(info.components)),
                   info.max_rank)


def fresh(base: Any, recipe: ModelRecipe) -> Any:
    """The recipe realized on a copy of the untouched pipeline with plain diffusers calls."""
    pipe = copy.deepcopy(base)
    te = ("text_encoder",)
    for group, scale in recipe.fused_groups():
        for a in group:
            pipe.load_lora_weights(a.path, adapter_name=a.slot)
        pipe.set_adapters([a.slot for a in group], [a.weights(te) for a in group])
        pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=scale, adapter_names=[a.slot for a in group])
        pipe.unload_lora_weights()
    live = list(recipe.live().values())
    for a in live:
        pipe.load_lora_weights(a.path, adapter_name=a.slot)
    if live:
        pipe.set_adapters([a.slot for a in live], [a.weights(te) for a in live])
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
    got, want = signature(resident.pipe), signature(fresh(base, recipe))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
    assert adapters_on(resident.pipe) == slots(recipe)
    assert resident.applied == recipe


STRENGTHS = st.sampled_from([1.0, 0.5, -0.7, 1.3])
BLOCKS = st.sampled_from(["", '{"down": 0.2, "up": {"block_0": [0.5, 1.0, 0.0]}}', '{"mid": 0.0}'])
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


# derandomize: one resident is shared across examples, so a failure depends on the examples before it
# and cannot be replayed alone; fixed examples keep CI reproducible. An intermittent failure under
# random examples is open (a text-encoder difference after some earlier sequences; see the closing
# note of issues 5 and 6).
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(LOAD, max_size=3), st.lists(EDITS, min_size=1, max_size=5))
def test_any_sequence_of_edits_reconciles_to_the_fresh_result(
    resident: Resident, base: Any, demo_dir: Path, ops: list[Any], edits: list[Any]
) -> None:
    root = resident.applied.bare()
    for change in [None, *edits]:
        ops = edit(ops, change) if change else ops
        recipe = build(demo_dir, root, ops)
        reconcile(resident, recipe)
        assert_realizes(resident, base, recipe)


def test_strength_change_is_set_adapters_only(resident: Resident, demo_dir: Path) -> None:
    root = resident.applied.bare()
    one = root.then(adapter(demo_dir, "tiny-sd15-style", "a", 1.0))
    reconcile(resident, one)
    assert reconcile(resident, root.then(adapter(demo_dir, "tiny-sd15-style", "a", 0.4))) == ["scales"]
    both = root.then(adapter(demo_dir, "tiny-sd15-style", "a", 0.4)).then(adapter(demo_dir, "tiny-sd15-kohya", "b"))
    assert reconcile(resident, both) == ["load:b", "scales"]
    assert reconcile(resident, both) == []
    assert reconcile(resident, root.then(adapter(demo_dir, "tiny-sd15-kohya", "b"))) == ["delete:a", "scales"]


def test_unfused_weights_come_back_bitwise(resident: Resident, demo_dir: Path) -> None:
    root = resident.applied.bare()
    reconcile(resident, root)
    before = {k: v.clone() for k, v in resident.pipe.unet.state_dict().items()}
    fused = root.then(adapter(demo_dir, "tiny-sd15-te", "a", 0.8)).then(Fuse(("a",), 0.7))
    assert reconcile(resident, fused) == ["fuse"]
    changed = [k for k, v in resident.pipe.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # the fuse really changed the weights
    assert reconcile(resident, root) == ["restore_base"]
    after = resident.pipe.unet.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_failed_transition_keeps_the_last_good_state(resident: Resident, base: Any, demo_dir: Path) -> None:
    root = resident.applied.bare()
    good = root.then(adapter(demo_dir, "tiny-sd15-style", "a", 0.6))
    reconcile(resident, good)
    wrong_model = adapter(demo_dir, "tiny-sdxl-style", "b")  # a LoRA for another architecture
    with pytest.raises(ReconcileError, match="tiny-sdxl-style.safetensors"):
        reconcile(resident, good.then(wrong_model))
    assert not resident.broken
    assert_realizes(resident, base, good)
    after = good.then(adapter(demo_dir, "tiny-sd15-kohya", "b"))
    reconcile(resident, after)  # the next run works
    assert_realizes(resident, base, after)


