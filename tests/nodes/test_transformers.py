"""SD3 and Flux on the demo models: loading (folder, Flux transformer file), LoRAs through the reconciler
(equal to plain diffusers calls), fuse with exact restore, schedules, and Sample with flow matching."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from nodegraph import events as ev
from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodes.engine import schedules
from nodes.engine.checkpoints import detect_family, load_pipeline
from nodes.engine.recipe import Fuse, ModelRecipe
from nodes.engine.reconcile import peft_name, reconcile
from nodes.engine.resident import Resident
from nodes.engine.sigmas import initial_noise
from nodes.engine.transformer_checkpoints import flux_from_original, flux_to_original
from tests.conftest import Recorder, workflow
from tests.nodes.test_reconcile import STRENGTHS, adapter_at, edit

ATOL = 1e-5


@pytest.fixture(scope="module")
def executor(registry: Registry, demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    return Executor(registry, Settings(models_dirs=(demo_dir,), output_dir=tmp_path_factory.mktemp("out")))


def graph(checkpoint: str = "tiny-flux", loras: tuple[tuple[str, float], ...] = (("tiny-flux-style", 0.8),),
          negative: str = "", steps: int = 3, guidance: float = 3.5, fuse: bool = False,
          schedule: dict[str, Any] | None = None, sampler: str = "euler") -> dict[str, Any]:
    nodes: dict[str, Any] = {"ckpt": {"type": "LoadCheckpoint", "inputs": {"checkpoint": checkpoint, "dtype": "fp32"}}}
    model = ["ckpt", 0]
    for i, (lora, strength) in enumerate(loras):
        nodes[f"lora{i}"] = {"type": "LoadLoRA", "inputs": {"model": model, "lora": f"{lora}.safetensors",
                                                             "slot": f"s{i}", "strength": strength}}
        model = [f"lora{i}", 0]
    if fuse:
        nodes["fuse"] = {"type": "FuseLoRA", "inputs": {"model": model}}
        model = ["fuse", 0]
    if schedule:
        nodes["schedule"] = {"type": "ScaleSchedule", "inputs": {"model": model, "slot": "s0", **schedule}}
        model = ["schedule", 0]
    nodes["sample"] = {"type": "Sample", "inputs": {"model": model, "prompt": "a red fox", "negative_prompt": negative,
                                                    "seed": 4, "steps": steps, "guidance": guidance, "width": 64,
                                                    "height": 64, "sampler_name": sampler,
                                                    "scheduler": "simple"}}
    nodes["show"] = {"type": "Show", "inputs": {"value": ["sample", 0]}}
    return workflow(nodes)


def pixels(executor: Executor, wf: dict[str, Any], events: Recorder | None = None) -> np.ndarray:
    result = executor.run(wf, events if events is not None else Recorder())
    assert result.status == "ok", [p.message for p in result.errors]
    out: np.ndarray = result.nodes["show"].outputs["value"].pixels.astype(np.int16)
    return out


def reference(demo_dir: Path, checkpoint: str, loras: tuple[tuple[str, float], ...], steps: int = 3,
              guidance: float = 3.5, negative: str = "", on_step: Any = None) -> np.ndarray:
    """The same image with plain diffusers calls: load_lora_weights, set_adapters, the pipeline run on the
    sigmas of ComfyUI's `simple` schedule for the family's default shift (what Sample's KSampler runs)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from nodes.engine.flow import FlowModel
    from nodes.engine.sigmas import sigmas

    pipe = load_pipeline(demo_dir / "checkpoints" / checkpoint)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    for i, (lora, _) in enumerate(loras):
        pipe.load_lora_weights(str(demo_dir / "loras" / f"{lora}.safetensors"), adapter_name=f"s{i}")
    if loras:
        pipe.set_adapters([f"s{i}" for i in range(len(loras))], [s for _, s in loras])
    schedule = sigmas("simple", FlowModel.for_family(checkpoint.removeprefix("tiny-")), steps)  # type: ignore[arg-type]
    latents = initial_noise(4, (1, 16, 8, 8))
    kwargs: dict[str, Any] = {}
    if checkpoint == "tiny-flux":
        latents = pipe._pack_latents(latents, 1, 16, 8, 8)
    else:
        kwargs["negative_prompt"] = negative or None
    image = pipe(prompt="a red fox", num_inference_steps=steps, guidance_scale=guidance, width=64, height=64,
                 latents=latents, sigmas=schedule[:-1].tolist(), output_type="np", callback_on_step_end=on_step,
                 **kwargs).images
    return (np.clip(image, 0, 1) * 255).astype(np.int16)  # truncated to 8 bits, as VAEDecode does


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    diff = np.abs(a - b)
    assert diff.mean() < 0.25 and diff.max() <= 8, (diff.mean(), diff.max())


# ---------------------------------------------------------------------------------------------- loading


def test_families_are_detected_from_folders_and_the_transformer_file(demo_dir: Path) -> None:
    assert detect_family(demo_dir / "checkpoints" / "tiny-flux") == "flux"
    assert detect_family(demo_dir / "checkpoints" / "tiny-sd3") == "sd3"
    assert detect_family(demo_dir / "diffusion_models" / "tiny-flux.safetensors") == "flux"


def test_flux_transformer_file_loads_the_folders_weights_bitwise(demo_dir: Path) -> None:
    folder = load_pipeline(demo_dir / "checkpoints" / "tiny-flux").transformer
    single = load_pipeline(demo_dir / "diffusion_models" / "tiny-flux.safetensors")
    public = {k: v for k, v in folder.config.items() if not k.startswith("_")}
    assert {k: v for k, v in single.transformer.config.items() if not k.startswith("_")} == public
    want, got = folder.state_dict(), single.transformer.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert single.scheduler.config.use_dynamic_shifting  # dev: guidance embedding, resolution-dependent shift


def test_original_layout_matches_diffusers_own_conversion_at_flux1_width() -> None:
    """diffusers converts full-width files (3072 wide); ours is the same mapping, sized from the file."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    config = dict(model.config)
    original = flux_to_original(model.state_dict())
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    ours = flux_from_original(Path("x"), dict(original), config)
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items()}
    assert ours.keys() == model.state_dict().keys()


def test_checkpoint_loader_refuses_a_transformer_only_file_and_unet_loader_takes_it(
        executor: Executor, demo_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    transformer_file = demo_dir / "diffusion_models" / "tiny-flux.safetensors"
    (tmp_path / "checkpoints" / "flux-t.safetensors").symlink_to(transformer_file)
    settings = Settings(models_dirs=(demo_dir, tmp_path), output_dir=tmp_path / "out")
    runner = Executor(executor.registry, settings)
    loader = {"type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux-t.safetensors"}}
    result = runner.run(workflow({"c": loader, "s": {"type": "Show", "inputs": {"value": ["c", 0]}}}))
    assert result.status == "error" and "UNETLoader" in result.errors[0].message
    result = runner.run(workflow({"u": {"type": "UNETLoader", "inputs": {"unet_name": "tiny-flux.safetensors"}},
                                  "s": {"type": "Show", "inputs": {"value": ["u", 0]}}}))
    assert result.status == "ok"
    assert result.nodes["u"].outputs["MODEL"].family == "flux"


# ---------------------------------------------------------------------------------------------- Sample + LoRAs


@pytest.mark.parametrize("checkpoint, loras, negative", [
    ("tiny-flux", (("tiny-flux-style", 0.8),), ""),
    ("tiny-flux", (("tiny-flux-kohya", 1.2),), ""),
    ("tiny-flux", (("tiny-flux-style", 0.6), ("tiny-flux-subset", -0.5)), ""),
    ("tiny-sd3", (("tiny-sd3-style", 0.7),), "blurry"),
])
def test_sample_with_loras_equals_plain_diffusers(executor: Executor, demo_dir: Path, checkpoint: str,
                                                  loras: tuple[tuple[str, float], ...], negative: str) -> None:
    ours = pixels(executor, graph(checkpoint, loras, negative))
    assert_close(ours, reference(demo_dir, checkpoint, loras, negative=negative))
    assert np.abs(ours - reference(demo_dir, checkpoint, ())).mean() > 1  # the LoRAs really change the image


def test_strength_change_on_flux_only_rescales(executor: Executor) -> None:
    executor.cache.clear()
    pixels(executor, graph(loras=(("tiny-flux-style", 0.8),)))
    events = Recorder()
    pixels(executor, graph(loras=(("tiny-flux-style", 0.3),)), events)
    assert [e.message for e in events.of(ev.NodeInfo) if e.kind == "reconcile"] == ["model: scales"]


def test_flux_guidance_reaches_the_guidance_embedding(executor: Executor) -> None:
    assert np.abs(pixels(executor, graph(guidance=1.0)) - pixels(executor, graph(guidance=6.0))).mean() > 1


def test_flux_schedule_equals_per_step_set_adapters(executor: Executor, demo_dir: Path) -> None:
    schedule = {"kind": "ramp_hold", "start": 1.5, "end": 0.7, "ramp_steps": 3, "hold": 0.2}
    spec = schedules.spec("ramp_hold", 1.5, 0.7, 3, 0.2, "")

    def on_step(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        pipe.set_adapters(["s0"], [schedules.scale_at(spec, step + 1)])
        return {}

    ours = pixels(executor, graph(loras=(("tiny-flux-style", 1.0),), schedule=schedule, steps=5))
    pipe_steps = reference(demo_dir, "tiny-flux", (("tiny-flux-style", schedules.scale_at(spec, 0)),), steps=5,
                           on_step=on_step)
    assert_close(ours, pipe_steps)
    assert np.abs(ours - pixels(executor, graph(loras=(("tiny-flux-style", 1.5),), steps=5))).mean() > 1


def test_fused_flux_lora_equals_live_and_unfuses(executor: Executor, demo_dir: Path) -> None:
    live = pixels(executor, graph(loras=(("tiny-flux-kohya", 0.9),)))
    assert_close(pixels(executor, graph(loras=(("tiny-flux-kohya", 0.9),), fuse=True)), live)
    assert_close(pixels(executor, graph(loras=())), reference(demo_dir, "tiny-flux", ()))  # unfused again


@pytest.mark.parametrize("bad, where", [({"negative": "blurry"}, "negative_prompt"),
                                        ({"sampler": "euler_ancestral"}, "sampler_name")])
def test_flux_sample_inputs_it_cannot_honour_are_node_errors(executor: Executor, bad: dict[str, str],
                                                             where: str) -> None:
    result = executor.run(graph(**bad))  # type: ignore[arg-type]
    assert result.status == "error"
    assert (result.errors[0].node_id, result.errors[0].input) == ("sample", where)


# ---------------------------------------------------------------------------------------------- reconciler

FLUX_LORAS = ["tiny-flux-style", "tiny-flux-kohya", "tiny-flux-subset", "tiny-flux-rank8"]


@pytest.fixture(scope="module")
def flux_base(demo_dir: Path) -> Any:
    pipe = load_pipeline(demo_dir / "checkpoints" / "tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def flux_signature(pipe: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    out: torch.Tensor = pipe.transformer(
        hidden_states=torch.randn(1, 16, 64, generator=gen), encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
        pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([0.6]),
        img_ids=ids.reshape(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5])).sample
    return out


def flux_fresh(base: Any, recipe: ModelRecipe) -> Any:
    pipe = copy.deepcopy(base)
    for group, scale in recipe.fused_groups():
        for a in group:
            pipe.load_lora_weights(a.path, adapter_name=a.slot)
        pipe.set_adapters([a.slot for a in group], [a.strength for a in group])
        pipe.fuse_lora(components=["transformer"], lora_scale=scale, adapter_names=[a.slot for a in group])
        pipe.unload_lora_weights()
    live = list(recipe.live().values())
    for a in live:
        pipe.load_lora_weights(a.path, adapter_name=a.slot)
    if live:
        pipe.set_adapters([a.slot for a in live], [a.strength for a in live])
    return pipe


def flux_build(demo_dir: Path, root: ModelRecipe, ops: list[Any]) -> ModelRecipe:
    recipe = root
    for op in ops:
        if op[0] == "load" and op[2] not in recipe.live():
            recipe = recipe.then(adapter_at(demo_dir / "loras" / f"{op[1]}.safetensors", op[2], op[3]))
        elif op[0] == "fuse" and recipe.live():
            recipe = recipe.then(Fuse(tuple(recipe.live()), op[1]))
    return recipe.prepared_for_hotswap(8) if ("hotswap", 8) in ops else recipe


def lora_names(pipe: Any) -> set[str]:
    return {name for m in pipe.transformer.modules() if hasattr(m, "lora_A") for name in m.lora_A}


FLUX_LOAD = st.tuples(st.just("load"), st.sampled_from(FLUX_LORAS), st.sampled_from("ab"), STRENGTHS)
FLUX_EDITS = st.one_of(
    st.tuples(st.just("strength"), st.integers(0, 4), STRENGTHS),
    st.tuples(st.just("file"), st.integers(0, 4), st.sampled_from(FLUX_LORAS)),
    st.tuples(st.just("add"), st.integers(0, 4), st.one_of(FLUX_LOAD, st.tuples(st.just("fuse"), st.just(1.0)))),
    st.tuples(st.just("remove"), st.integers(0, 4)),
    st.tuples(st.just("add"), st.integers(0, 4), st.just(("hotswap", 8))),
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(FLUX_LOAD, max_size=2), st.lists(FLUX_EDITS, min_size=1, max_size=4))
def test_any_sequence_of_flux_edits_reconciles_to_the_fresh_result(flux_base: Any, demo_dir: Path,
                                                                    ops: list[Any], edits: list[Any]) -> None:
    root = ModelRecipe(str(demo_dir / "checkpoints" / "tiny-flux"), "f", "flux", "fp32")
    resident = Resident.fresh(copy.deepcopy(flux_base), root)
    for change in [None, *edits]:
        ops = edit(ops, change) if change else ops
        recipe = flux_build(demo_dir, root, ops)
        note(f"{recipe.summary()} (hot-swap rank {recipe.hotswap_rank}): {reconcile(resident, recipe)}")
        torch.testing.assert_close(flux_signature(resident.pipe), flux_signature(flux_fresh(flux_base, recipe)),
                                   atol=ATOL, rtol=0)
        assert lora_names(resident.pipe) == {peft_name(slot) for slot in recipe.live()}


def test_unfused_flux_weights_come_back_bitwise(flux_base: Any, demo_dir: Path) -> None:
    root = ModelRecipe(str(demo_dir / "checkpoints" / "tiny-flux"), "f", "flux", "fp32")
    resident = Resident.fresh(copy.deepcopy(flux_base), root)
    before = {k: v.clone() for k, v in resident.pipe.transformer.state_dict().items()}
    lora = root.then(adapter_at(demo_dir / "loras" / "tiny-flux-kohya.safetensors", "a", 0.7))
    assert "fuse" in reconcile(resident, lora.then(Fuse(("a",), 1.0)))
    assert any(not torch.equal(before[k], v) for k, v in resident.pipe.transformer.state_dict().items())
    assert reconcile(resident, root) == ["restore_base"]
    after = resident.pipe.transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------- hot-swap, compile


def swap_graph(lora: str, strength: float, compile: bool, schedule: dict[str, Any] | None = None) -> dict[str, Any]:
    wf = graph(loras=(("tiny-flux-style", strength),), schedule=schedule)
    nodes = wf["nodes"]
    nodes["swap"] = {"type": "HotswapLoRA", "inputs": {"model": ["lora0", 0], "lora": f"{lora}.safetensors",
                                                        "slot": "s0", "strength": strength, "hotswap_rank": 8}}
    model = ["swap", 0]
    if compile:
        nodes["compile"] = {"type": "CompileModel", "inputs": {"model": model}}
        model = ["compile", 0]
    (nodes["schedule"] if schedule else nodes["sample"])["inputs"]["model"] = model
    return wf


def test_compiled_flux_transformer_never_recompiles_across_swaps_strengths_and_schedules(
        registry: Registry, demo_dir: Path, executor: Executor, tmp_path: Path) -> None:
    compiled = Executor(registry, Settings(models_dirs=(demo_dir,), output_dir=tmp_path))
    events = Recorder()
    pixels(compiled, swap_graph("tiny-flux-style", 1.0, compile=True), events)  # compiles once
    assert [e.kind for e in events.of(ev.NodeInfo)].count("compile") == 1
    cases = [("tiny-flux-rank8", 0.7, None), ("tiny-flux-subset", 1.2, None), ("tiny-flux-style", 0.5, None),
             ("tiny-flux-rank8", 1.0, {"kind": "linear", "start": 1.5, "end": 0.2, "ramp_steps": 2})]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lora, strength, schedule in cases:
            events = Recorder()
            got = pixels(compiled, swap_graph(lora, strength, True, schedule), events)
            assert "compile" not in [e.kind for e in events.of(ev.NodeInfo)]
            messages = [e.message for e in events.of(ev.NodeInfo) if e.kind == "reconcile"]
            assert any("hotswap:s0" in m for m in messages) or lora == cases[0][0], messages
            assert all("load:" not in m and "delete:" not in m for m in messages), messages
            assert_close(got, pixels(executor, swap_graph(lora, strength, False, schedule)))


def test_sweep_over_flux_lora_files_in_a_hot_swapped_slot_equals_each_run_alone(
        registry: Registry, demo_dir: Path, executor: Executor, tmp_path: Path) -> None:
    from nodegraph.sweep import Axis, run_sweep

    wf = swap_graph("tiny-flux-rank8", 0.9, compile=False)
    files = ("tiny-flux-rank8.safetensors", "tiny-flux-subset.safetensors", "tiny-flux-style.safetensors")
    swept = run_sweep(Executor(registry, Settings(models_dirs=(demo_dir,), output_dir=tmp_path)), wf,
                      [Axis("swap", "lora", files)])
    assert swept.status == "ok", swept.to_json()
    for job, lora in zip(swept.jobs, files, strict=True):
        assert job.result is not None
        got = job.result.nodes["show"].outputs["value"].pixels.astype(np.int16)
        assert_close(got, pixels(executor, swap_graph(lora.removesuffix(".safetensors"), 0.9, compile=False)))


def test_unfused_sd3_weights_come_back_bitwise(demo_dir: Path) -> None:
    pipe = load_pipeline(demo_dir / "checkpoints" / "tiny-sd3")
    root = ModelRecipe(str(demo_dir / "checkpoints" / "tiny-sd3"), "f", "sd3", "fp32")
    resident = Resident.fresh(pipe, root)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    lora = root.then(adapter_at(demo_dir / "loras" / "tiny-sd3-style.safetensors", "a", 0.7))
    assert "fuse" in reconcile(resident, lora.then(Fuse(("a",), 1.0)))
    assert any(not torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())
    assert reconcile(resident, root) == ["restore_base"]
    after = pipe.transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("loader", [
    {"type": "LoadCheckpoint", "inputs": {"checkpoint": "tiny-flux"}},
    {"type": "UNETLoader", "inputs": {"unet_name": "tiny-flux.safetensors"}},
])
def test_a_lora_for_another_architecture_is_a_validation_error_on_flux(executor: Executor,
                                                                       loader: dict[str, Any]) -> None:
    result = executor.run(workflow({
        "m": loader,
        "l": {"type": "LoraLoaderModelOnly", "inputs": {"model": ["m", 0], "lora_name": "tiny-sd15-style.safetensors",
                                                        "strength_model": 1.0}},
        "s": {"type": "Show", "inputs": {"value": ["l", 0]}}}))
    assert result.status == "invalid"
    assert (result.errors[0].node_id, result.errors[0].input, result.errors[0].code) == ("l", "lora_name",
                                                                                        "wrong_model")


def test_hotswap_of_a_flux_file_with_layers_outside_the_slot_is_refused_on_the_node(executor: Executor) -> None:
    result = executor.run(swap_graph("tiny-flux-kohya", 1.0, compile=False))
    assert result.status == "error"
    problem = result.errors[0]
    assert (problem.node_id, problem.input, problem.code) == ("swap", "lora", "not_swappable")
    assert "to_add_out" in problem.message or "proj_out" in problem.message
