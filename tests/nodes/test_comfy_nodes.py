"""ComfyUI's core nodes on the demo models: API-format workflows unchanged, caching per side, samplers."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph import events as ev
from nodegraph.cli import main
from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodegraph.workflow import lower_comfy_api
from tests.conftest import Recorder

ROOT = Path(__file__).parents[2]
COMFY = ROOT / "workflows" / "comfyui"


def comfy(name: str) -> dict[str, Any]:
    return json.loads((COMFY / name).read_text())


def txt2img(**changes: Any) -> dict[str, Any]:
    """ComfyUI's default txt2img + LoRA graph (API format); changes: {"node.input": value}."""
    graph = comfy("txt2img_lora.json")
    graph["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    for where, value in changes.items():
        node, name = where.split(".")
        graph[node]["inputs"][name] = value
    return lower_comfy_api(graph)


@pytest.fixture(scope="module")
def shared(registry: Registry, demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    return Executor(registry, Settings(models_dirs=(demo_dir,), output_dir=tmp_path_factory.mktemp("out")))


def run(executor: Executor, wf: dict[str, Any], events: Recorder | None = None) -> Any:
    result = executor.run(wf, events if events is not None else Recorder())
    assert result.status == "ok", result.errors
    return result


def latent(result: Any, node: str) -> torch.Tensor:
    samples: torch.Tensor = result.nodes[node].outputs["LATENT"].samples
    return samples


def reconciled(events: Recorder) -> list[str]:
    return [e.message for e in events.of(ev.NodeInfo) if e.kind == "reconcile"]


@pytest.mark.parametrize("name", sorted(p.name for p in COMFY.glob("*.json")))
def test_comfyui_api_workflows_run_unchanged_from_the_command_line(name: str, demo_dir: Path, demo_input: Path,
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(COMFY / name), "--models-dir", str(demo_dir), "--input-dir", str(demo_input),
                 "--output-dir", str(tmp_path), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["status"] == "ok", result["errors"]
    [path] = result["files"]
    with Image.open(path) as image:
        assert image.size == (64, 64)
        assert np.asarray(image).std() > 1  # a picture, not a flat field


def test_only_what_a_change_touches_runs_again(shared: Executor) -> None:
    run(shared, txt2img())
    events = Recorder()
    run(shared, txt2img(**{"7.text": "ugly"}), events)
    assert sorted(events.ran()) == ["3", "7", "8", "9"]  # the negative prompt, then the sampler onwards
    events = Recorder()
    run(shared, txt2img(**{"7.text": "ugly", "3.denoise": 0.8}), events)
    assert sorted(events.ran()) == ["3", "8", "9"]


def test_a_clip_strength_change_re_encodes_without_touching_the_unet(shared: Executor) -> None:
    run(shared, txt2img())
    events = Recorder()
    run(shared, txt2img(**{"10.strength_clip": 0.5}), events)
    assert sorted(events.ran()) == ["10", "3", "6", "7", "8", "9"]
    assert reconciled(events) == ["clip: scales"]  # the MODEL's LoRA was not reloaded or rescaled


def test_model_only_lora_leaves_the_text_encoders_alone(shared: Executor) -> None:
    wf = txt2img()
    wf["nodes"]["10"] = {"type": "LoraLoaderModelOnly", "inputs": {"model": ["4", 0], "lora_name":
                                                                    "tiny-sd15-te.safetensors", "strength_model": 1.0}}
    for node in ("6", "7"):
        wf["nodes"][node]["inputs"]["clip"] = ["4", 1]
    plain = txt2img(**{"10.strength_clip": 0.0})  # the same MODEL side; strength 0 leaves the CLIP untouched
    a = run(shared, wf).nodes["6"].outputs["CONDITIONING"].entries[0].embeds
    b = run(shared, plain).nodes["6"].outputs["CONDITIONING"].entries[0].embeds
    assert torch.equal(a, b)
    for graph in (wf, txt2img(), wf, txt2img()):  # CLIP sides differ, MODEL sides agree: the UNet is never touched
        events = Recorder()
        shared.cache.clear()
        run(shared, graph, events)
        assert [m for m in reconciled(events) if m.startswith("model:")] == []


def test_two_ksampler_advanced_halves_equal_one_full_run(shared: Executor) -> None:
    halves = lower_comfy_api(comfy("ksampler_advanced.json"))
    full = copy.deepcopy(halves)
    full["nodes"]["11"]["inputs"].update({"latent_image": ["5", 0], "add_noise": "enable", "start_at_step": 0})
    a, b = latent(run(shared, halves), "11"), latent(run(shared, full), "11")
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    first = latent(run(shared, halves), "10")
    assert (first - a).abs().mean() > 0.1  # the first half stops half way, with its noise left in


def test_same_seed_same_latent_and_the_seed_matters(shared: Executor) -> None:
    a, b = latent(run(shared, txt2img()), "3"), latent(run(shared, txt2img(**{"3.seed": 1})), "3")
    shared.cache.clear()
    assert torch.equal(a, latent(run(shared, txt2img()), "3"))
    assert not torch.equal(a, b)


def test_image_to_image_keeps_the_input_at_low_denoise(shared: Executor) -> None:
    first = run(shared, txt2img())
    wf = txt2img()
    wf["nodes"]["20"] = {"type": "VAEEncode", "inputs": {"pixels": ["8", 0], "vae": ["4", 2]}}
    wf["nodes"]["21"] = {"type": "KSampler", "inputs": {**wf["nodes"]["3"]["inputs"], "latent_image": ["20", 0],
                                                       "denoise": 0.0, "seed": 5}}
    wf["nodes"]["22"] = {"type": "VAEDecode", "inputs": {"samples": ["21", 0], "vae": ["4", 2]}}
    wf["nodes"]["23"] = {"type": "PreviewImage", "inputs": {"images": ["22", 0]}}
    result = run(shared, wf)
    assert torch.equal(latent(result, "21"), latent(result, "20"))  # denoise 0: nothing sampled
    encoded, moved = latent(result, "20"), []
    for denoise in (0.2, 0.6, 1.0):  # the lower the denoise, the more of the input survives
        wf["nodes"]["21"]["inputs"]["denoise"] = denoise
        moved.append(float((latent(run(shared, wf), "21") - encoded).abs().mean()))
    assert 0 < moved[0] < moved[1] < moved[2], moved
    assert first.nodes["8"].outputs["IMAGE"].pixels.shape == (1, 64, 64, 3)


def test_every_sampler_and_scheduler_runs(shared: Executor) -> None:
    from nodes.engine.samplers import SAMPLERS
    from nodes.engine.sigmas import SCHEDULERS

    for sampler, scheduler in zip(SAMPLERS, [*SCHEDULERS, *SCHEDULERS], strict=False):
        out = latent(run(shared, txt2img(**{"3.sampler_name": sampler, "3.scheduler": scheduler, "3.steps": 3})), "3")
        assert torch.isfinite(out).all() and out.std() > 0, (sampler, scheduler)


def test_clip_skip_and_conditioning_nodes(shared: Executor) -> None:
    wf = txt2img()
    wf["nodes"]["30"] = {"type": "CLIPSetLastLayer", "inputs": {"clip": ["10", 1], "stop_at_clip_layer": -2}}
    wf["nodes"]["31"] = {"type": "CLIPTextEncode", "inputs": {"text": wf["nodes"]["6"]["inputs"]["text"],
                                                             "clip": ["30", 0]}}
    wf["nodes"]["32"] = {"type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}}
    wf["nodes"]["33"] = {"type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0],
                                                                   "conditioning_2": ["6", 0]}}
    for node in ("31", "32", "33"):  # shown, so they run
        wf["nodes"][f"show{node}"] = {"type": "Show", "inputs": {"value": [node, 0]}}
    result = run(shared, wf)
    embeds = {n: result.nodes[n].outputs["CONDITIONING"].entries for n in ("6", "31", "32", "33")}
    assert not torch.equal(embeds["6"][0].embeds, embeds["31"][0].embeds)
    assert not embeds["32"][0].embeds.any()
    assert len(embeds["33"]) == 2
    wf["nodes"]["3"]["inputs"]["positive"] = ["33", 0]  # the same entry twice averages to itself
    torch.testing.assert_close(latent(run(shared, wf), "3"), latent(result, "3"), atol=1e-3, rtol=1e-4)
    wf["nodes"]["30"]["inputs"]["stop_at_clip_layer"] = -24
    failed = shared.run(wf)
    assert failed.status == "error" and failed.errors[0].node_id == "31" and "layers" in failed.errors[0].message


def test_sdxl_graph(shared: Executor) -> None:
    wf = txt2img(**{"4.ckpt_name": "tiny-sdxl", "10.lora_name": "tiny-sdxl-style.safetensors"})
    image = run(shared, wf).nodes["8"].outputs["IMAGE"].pixels
    assert image.shape == (1, 64, 64, 3)
    wrong = txt2img(**{"4.ckpt_name": "tiny-sdxl"})  # an SD1.5 LoRA on SDXL: refused on the loader, at validation
    failed = shared.run(wrong)
    assert failed.status == "invalid" and (failed.errors[0].node_id, failed.errors[0].code) == ("10", "wrong_model")


def test_our_lora_nodes_slot_into_a_comfyui_graph(shared: Executor) -> None:
    """HotswapLoRA and ScaleSchedule take and return the MODEL of ComfyUI's loaders, and KSampler honours them."""
    swapped = txt2img(**{"10.lora_name": "tiny-sd15-style.safetensors", "10.strength_clip": 0.0})
    swapped["nodes"]["11"] = {"type": "HotswapLoRA", "inputs": {"model": ["10", 0],
                                                                "lora": "tiny-sd15-kohya.safetensors"}}
    swapped["nodes"]["3"]["inputs"]["model"] = ["11", 0]
    direct = txt2img(**{"10.lora_name": "tiny-sd15-kohya.safetensors", "10.strength_clip": 0.0})
    torch.testing.assert_close(latent(run(shared, swapped), "3"), latent(run(shared, direct), "3"),
                               atol=1e-2, rtol=1e-3)  # padded ranks reorder sums; otherwise the same
    scheduled = txt2img(**{"10.strength_clip": 0.0})
    scheduled["nodes"]["12"] = {"type": "ScaleSchedule", "inputs": {"model": ["10", 0], "kind": "constant",
                                                                    "start": 0.0}}
    scheduled["nodes"]["3"]["inputs"]["model"] = ["12", 0]
    none = txt2img(**{"10.strength_model": 0.0, "10.strength_clip": 0.0})
    torch.testing.assert_close(latent(run(shared, scheduled), "3"), latent(run(shared, none), "3"),
                               atol=1e-3, rtol=1e-4)  # a schedule at 0 on every step is no LoRA


def test_vae_decode_decodes_large_images_in_tiles(shared: Executor, monkeypatch: pytest.MonkeyPatch) -> None:
    from nodes.engine import memory

    wf = txt2img(**{"5.width": 128, "5.height": 128, "3.steps": 1})
    run(shared, wf)
    calls: list[tuple[int, ...]] = []
    hooks = [entry.value.pipe.vae.decoder.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
             for entry in shared.models.resident() if hasattr(getattr(entry.value, "pipe", None), "vae")]
    try:
        monkeypatch.setattr(memory, "TILE_ABOVE_PIXELS", 64 * 64)  # the demo VAE's tiles are 64 pixels
        shared.cache.clear()
        image = run(shared, wf).nodes["8"].outputs["IMAGE"].pixels
    finally:
        for hook in hooks:
            hook.remove()
    assert image.shape == (1, 128, 128, 3)
    assert len(calls) > 1 and all(shape[-1] <= 8 and shape[-2] <= 8 for shape in calls)  # latent tiles
