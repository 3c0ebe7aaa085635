"""HotswapLoRA, ScaleSchedule and CompileModel on the demo models: in-place swaps, per-step
scales, and the zero-recompile guarantee on a compiled UNet."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nodegraph import events as ev
from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodegraph.sweep import Axis, run_sweep
from nodes.engine import schedules
from nodes.engine.checkpoints import load_pipeline
from nodes.lora import HotswapLoRA
from tests.conftest import Recorder, workflow


def graph(first: str = "tiny-sd15-style", swap: str | None = None, strength: float = 1.0, rank: int = 0,
          schedule: dict[str, Any] | None = None, compile: bool = False, slot: str = "s",
          steps: int = 3) -> dict[str, Any]:
    nodes: dict[str, Any] = {
        "ckpt": {"type": "LoadCheckpoint", "inputs": {"checkpoint": "tiny-sd15", "dtype": "fp32"}},
        "lora": {"type": "LoadLoRA", "inputs": {"model": ["ckpt", 0], "lora": f"{first}.safetensors", "slot": "s",
                                                 "strength": strength}}}
    model = ["lora", 0]
    if swap:
        nodes["swap"] = {"type": "HotswapLoRA", "inputs": {"model": model, "lora": f"{swap}.safetensors",
                                                            "slot": slot, "strength": strength, "hotswap_rank": rank}}
        model = ["swap", 0]
    if compile:
        nodes["compile"] = {"type": "CompileModel", "inputs": {"model": model}}
        model = ["compile", 0]
    if schedule:
        nodes["schedule"] = {"type": "ScaleSchedule", "inputs": {"model": model, "slot": "s", **schedule}}
        model = ["schedule", 0]
    nodes["sample"] = {"type": "Sample", "inputs": {"model": model, "prompt": "a castle", "seed": 4, "steps": steps,
                                                    "width": 64, "height": 64, "sampler_name": "euler",
                                                    "scheduler": "normal"}}
    nodes["show"] = {"type": "Show", "inputs": {"value": ["sample", 0]}}
    return workflow(nodes)


@pytest.fixture(scope="module")
def eager(registry: Registry, demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    return Executor(registry, Settings(models_dirs=(demo_dir,), output_dir=tmp_path_factory.mktemp("out")))


def pixels(executor: Executor, wf: dict[str, Any], events: Recorder | None = None) -> np.ndarray:
    result = executor.run(wf, events if events is not None else Recorder())
    assert result.status == "ok", result.errors
    out: np.ndarray = result.nodes["show"].outputs["value"].pixels.astype(np.int16)
    return out


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    """Same image up to float noise: a pipeline prepared for hot-swap pads LoRAs with zero ranks,
    which reorders sums, and steps amplify the last bits into a few uint8 levels here and there."""
    diff = np.abs(a - b)
    assert diff.mean() < 0.25 and diff.max() <= 8, (diff.mean(), diff.max())


def reconciled(events: Recorder) -> list[str]:
    return [e.message for e in events.of(ev.NodeInfo) if e.kind == "reconcile"]


def test_hotswap_equals_a_normal_load_and_swaps_in_place(eager: Executor) -> None:
    swapped = pixels(eager, graph(swap="tiny-sd15-alpha", strength=0.8))
    eager.cache.clear()
    assert_close(swapped, pixels(eager, graph("tiny-sd15-alpha", strength=0.8)))
    events = Recorder()
    # The slot may hold ranks up to 8 (a sweep finds this itself: HotswapLoRA.prepare_sweep).
    pixels(eager, graph(swap="tiny-sd15-alpha", strength=0.8, rank=8))
    for lora in ("tiny-sd15-rank2", "tiny-sd15-subset", "tiny-sd15-kohya"):
        events = Recorder()
        image = pixels(eager, graph(swap=lora, strength=0.8, rank=8), events)
        assert reconciled(events) == ["model: hotswap:s, scales"]
        eager.cache.clear()
        assert_close(image, pixels(eager, graph(lora, strength=0.8)))


@pytest.mark.parametrize("swap, rank, where", [
    ("tiny-sd15-te", 0, "lora"),             # text-encoder layers
    ("tiny-sd15-subset", 2, "hotswap_rank"),  # rank 4 > 2
])
def test_swaps_the_files_rule_out_are_validation_errors(eager: Executor, swap: str, rank: int, where: str) -> None:
    result = eager.run(graph("tiny-sd15-subset", swap=swap, rank=rank))
    assert result.status == "invalid" and not result.nodes  # nothing ran
    assert [(p.node_id, p.input, p.code) for p in result.errors] == [("swap", where, "invalid_value")]


@pytest.mark.parametrize("swap, slot, code, where", [
    ("tiny-sd15-style", "s", "not_swappable", "lora"),  # layers the subset in the slot lacks
    ("tiny-sd15-subset", "other", "unknown_slot", "slot"),
])
def test_swaps_that_depend_on_the_slot_are_node_errors(eager: Executor, swap: str, slot: str, code: str,
                                                       where: str) -> None:
    result = eager.run(graph("tiny-sd15-subset", swap=swap, slot=slot))
    assert result.status == "error" and "sample" not in result.nodes  # before any model was touched
    assert [(p.node_id, p.input, p.code) for p in result.errors] == [("swap", where, code)]


def test_sweep_over_a_slot_feeding_a_hot_swap_equals_each_workflow_run_alone(
        registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    """Regression: the second job hot-swapped slot `a` out of a text-encoder LoRA and kept its text-encoder
    layers, 74/255 away from the same workflow run alone."""
    wf = workflow({
        "1": {"type": "LoadCheckpoint", "inputs": {"checkpoint": "tiny-sd15", "dtype": "fp32"}},
        "2": {"type": "LoadLoRA", "inputs": {"model": ["1", 0], "lora": "tiny-sd15-te.safetensors", "slot": "a"}},
        "3": {"type": "LoadLoRA", "inputs": {"model": ["2", 0], "lora": "tiny-sd15-style.safetensors", "slot": "b"}},
        "4": {"type": "HotswapLoRA", "inputs": {"model": ["3", 0], "lora": "tiny-sd15-rank8.safetensors",
                                                "slot": "b"}},
        "5": {"type": "Sample", "inputs": {"model": ["4", 0], "prompt": "a castle", "seed": 4, "steps": 3,
                                           "width": 64, "height": 64}},
        "show": {"type": "Show", "inputs": {"value": ["5", 0]}}})
    files = ("tiny-sd15-te.safetensors", "tiny-sd15-kohya.safetensors")
    settings = Settings(models_dirs=(demo_dir,), output_dir=tmp_path)
    swept = run_sweep(Executor(registry, settings), wf, [Axis("2", "lora", files)])
    assert swept.status == "ok", swept.to_json()
    second = swept.jobs[1].result
    assert second is not None
    alone = copy.deepcopy(wf)
    alone["nodes"]["2"]["inputs"]["lora"] = files[1]
    swept_image = second.nodes["show"].outputs["value"].pixels.astype(np.int16)
    assert_close(swept_image, pixels(Executor(registry, settings), alone))


def test_prepare_sweep_uses_the_largest_rank(demo_settings: Settings) -> None:
    values = ["tiny-sd15-rank2.safetensors", "tiny-sd15-kohya.safetensors", "tiny-sd15-style.safetensors"]
    assert HotswapLoRA.prepare_sweep("lora", values, {"hotswap_rank": 0}, demo_settings) == {"hotswap_rank": 8}
    assert HotswapLoRA.prepare_sweep("lora", values, {"hotswap_rank": 16}, demo_settings) == {}
    assert HotswapLoRA.prepare_sweep("strength", [0.1, 1.0], {"hotswap_rank": 0}, demo_settings) == {}


def test_schedule_values_and_preview() -> None:
    ramp = schedules.spec("ramp_hold", 1.5, 0.7, 20, 0.2, "")
    assert np.allclose([schedules.scale_at(ramp, i) for i in range(20)], np.linspace(1.5, 0.7, 20))
    assert schedules.scale_at(ramp, 20) == schedules.scale_at(ramp, 49) == 0.2
    frames = schedules.spec("keyframes", 0, 0, 1, 0, '{"0": 1.0, "3": 0.5}')
    assert schedules.preview(frames) == [1.0, 1.0, 1.0, 0.5, 0.5]
    cosine = schedules.spec("cosine", 1.0, 0.0, 3, 0.0, "")
    assert schedules.preview(cosine) == [1.0, 0.5, 0.0, 0.0]
    assert schedules.scale_at(schedules.spec("linear", 0.0, 1.0, 5, 9, ""), 2) == 0.5
    with pytest.raises(ValueError, match="keyframes"):
        schedules.spec("keyframes", 0, 0, 1, 0, '{"x": 1}')


def reference_with_schedule(demo_dir: Path, spec: str, steps: int) -> np.ndarray:
    """diffusers' LoRA guide by hand: `set_adapters` with the scheduled weight before every step of a plain
    Euler loop over the KSampler's `normal` schedule (the sigmas, guidance and noise of nodes.engine, each
    tested on their own against the published formulas), on a freshly loaded pipeline."""
    from nodes.engine.samplers import CFGDenoiser
    from nodes.engine.sigmas import DiscreteModel, initial_noise, noised_latent, sigmas

    pipe = load_pipeline(demo_dir / "checkpoints" / "tiny-sd15")
    pipe.load_lora_weights(str(demo_dir / "loras" / "tiny-sd15-style.safetensors"), adapter_name="s")
    discrete = DiscreteModel.from_config(pipe.scheduler.config)
    schedule = sigmas("normal", discrete, steps, sampler="euler")
    with torch.inference_mode():
        cond, uncond = ({"embeds": pipe.encode_prompt(text, "cpu", 1, False)[0]} for text in ("a castle", ""))
        guided = CFGDenoiser(discrete, lambda x, t, c: pipe.unet(x, t, encoder_hidden_states=c["embeds"]).sample,
                             cond, uncond, 7.0)
        x = noised_latent(discrete, torch.zeros(1, 4, 8, 8), initial_noise(4, (1, 4, 8, 8)), schedule)
        for step, (sigma, down_to) in enumerate(zip(schedule[:-1], schedule[1:], strict=True)):
            pipe.set_adapters(["s"], [schedules.scale_at(spec, step)])
            x = x + (x - guided(x, sigma)) / sigma * (down_to - sigma)
        image = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return (((image + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.int16)


def test_schedule_equals_per_step_set_adapters(eager: Executor, demo_dir: Path) -> None:
    schedule = {"kind": "ramp_hold", "start": 1.5, "end": 0.5, "ramp_steps": 3, "hold": -0.5}
    ours = pixels(eager, graph(schedule=schedule, steps=5))
    spec = schedules.spec("ramp_hold", 1.5, 0.5, 3, -0.5, "")
    assert_close(ours, reference_with_schedule(demo_dir, spec, 5))
    constant = pixels(eager, graph(schedule={"kind": "constant", "start": 0.6}, steps=5))
    assert_close(constant, pixels(eager, graph(strength=0.6, steps=5)))
    assert np.abs(constant - ours).mean() > 2  # the schedule really changed something


def test_schedule_node_reports_its_scales(eager: Executor) -> None:
    result = eager.run(graph(schedule={"kind": "linear", "start": 1.0, "end": 0.0, "ramp_steps": 3}))
    assert result.nodes["schedule"].outputs["scales"] == "[1.0, 0.5, 0.0, 0.0]"


def test_compiled_model_never_recompiles_across_swaps_strengths_and_schedules(
        registry: Registry, demo_dir: Path, eager: Executor, tmp_path: Path) -> None:
    """One compiled pipeline (compiling takes about a minute here), then everything inside error_on_recompile."""
    compiled = Executor(registry, Settings(models_dirs=(demo_dir,), output_dir=tmp_path))
    events = Recorder()
    pixels(compiled, graph(swap="tiny-sd15-style", rank=8, compile=True), events)  # compiles once
    kinds = [e.kind for e in events.of(ev.NodeInfo)]
    assert kinds.count("compile") == 1 and kinds.index("compiling") < kinds.index("compile")  # said before, too
    assert "expect minutes" in next(e.message for e in events.of(ev.NodeInfo) if e.kind == "compiling")
    cases = [("tiny-sd15-alpha", 1.0, None), ("tiny-sd15-rank2", 0.7, None), ("tiny-sd15-rank8", 1.2, None),
             ("tiny-sd15-subset", 1.0, None), ("tiny-sd15-kohya", 0.5, None),
             ("tiny-sd15-alpha", 1.0, {"kind": "linear", "start": 1.5, "end": 0.2, "ramp_steps": 3})]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lora, strength, schedule in cases:
            events = Recorder()
            got = pixels(compiled, graph(swap=lora, strength=strength, rank=8, compile=True, schedule=schedule),
                         events)
            assert not {"compile", "compiling"} & {e.kind for e in events.of(ev.NodeInfo)}
            assert all("load:" not in m and "delete:" not in m for m in reconciled(events))
            want = pixels(eager, graph(lora, strength=strength, schedule=schedule))
            assert_close(got, want)


def test_compile_after_loadlora_prepares_for_the_loras_rank(eager: Executor) -> None:
    wf = graph("tiny-sd15-kohya", compile=True)
    del wf["nodes"]["sample"], wf["nodes"]["show"]
    wf["nodes"]["show"] = {"type": "Show", "inputs": {"value": ["compile", 0]}}
    recipe = eager.run(wf).nodes["compile"].outputs["model"]
    assert (recipe.hotswap_rank, recipe.compile is not None) == (8, True)  # the Kohya file is rank 8
