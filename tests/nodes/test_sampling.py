"""Sample (the ComfyUI graph in one node), seeds, the activation estimate and bounded decoding on the demo
models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nodegraph import events as ev
from nodegraph.context import CancelToken
from nodegraph.executor import Executor
from nodegraph.models import ModelManager
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodes.engine import memory as sampling
from nodes.engine import sigmas
from nodes.engine.memory import activation_bytes
from nodes.engine.sigmas import initial_noise
from tests.conftest import Recorder
from tests.nodes.test_diffusion import differs, graph, images


@pytest.fixture(scope="module")
def cpu(registry: Registry, demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    """One executor pinned to the CPU, whatever the machine has."""
    settings = Settings(models_dirs=(demo_dir,), output_dir=tmp_path_factory.mktemp("out"))
    return Executor(registry, settings, models=ModelManager(device="cpu"))


@pytest.mark.parametrize("seed, shape", [(0, (1, 4, 8, 8)), (42, (2, 4, 16, 24)), (2**64 - 1, (3, 4, 4, 4))])
def test_initial_noise_is_one_float32_cpu_draw_from_the_seed(seed: int, shape: tuple[int, ...]) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # ComfyUI's recipe: seed the global generator, one randn of the whole latent
        expected = torch.randn(shape, dtype=torch.float32, device="cpu")
    noise = initial_noise(seed, shape)
    assert noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert torch.equal(noise, expected)


def comfy_graph(sampler: str, scheduler: str, **sample: Any) -> dict[str, Any]:
    """What Sample stands for, as ComfyUI's nodes: both prompts encoded by the LoRA'd CLIP, an empty latent,
    KSampler and VAEDecode."""
    wf = graph(sampler_name=sampler, scheduler=scheduler, **sample)
    inputs = wf["nodes"].pop("sample")["inputs"]
    clip = ["lora", "CLIP"]
    wf["nodes"].update({
        "pos": {"type": "CLIPTextEncode", "inputs": {"text": inputs["prompt"], "clip": clip}},
        "neg": {"type": "CLIPTextEncode", "inputs": {"text": inputs.get("negative_prompt", ""), "clip": clip}},
        "empty": {"type": "EmptyLatentImage", "inputs": {"width": inputs["width"], "height": inputs["height"],
                                                         "batch_size": inputs.get("batch_size", 1)}},
        "ksampler": {"type": "KSampler", "inputs": {
            "model": ["lora", "MODEL"], "seed": inputs["seed"], "steps": inputs["steps"], "cfg": inputs["guidance"],
            "sampler_name": sampler, "scheduler": scheduler, "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["empty", 0], "denoise": 1.0}},
        "sample": {"type": "VAEDecode", "inputs": {"samples": ["ksampler", 0], "vae": ["ckpt", "VAE"]}}})
    wf["nodes"]["show"]["inputs"]["value"] = ["sample", 0]
    return wf


@pytest.mark.parametrize("sampler, scheduler", [("euler", "normal"), ("euler_ancestral", "karras"),
                                                ("dpmpp_2m", "simple")])
def test_sample_gives_the_pixels_of_the_comfyui_graph(cpu: Executor, sampler: str, scheduler: str) -> None:
    def with_lora(wf: dict[str, Any]) -> dict[str, Any]:
        wf["nodes"]["ckpt"] = {"type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15"}}
        wf["nodes"]["lora"] = {"type": "LoraLoader", "inputs": {
            "model": ["ckpt", "MODEL"], "clip": ["ckpt", "CLIP"], "lora_name": "tiny-sd15-te.safetensors",
            "strength_model": 0.7, "strength_clip": 0.7}}
        if "model" in wf["nodes"]["sample"]["inputs"]:
            wf["nodes"]["sample"]["inputs"]["model"] = ["lora", "MODEL"]
        return wf

    sample = dict(seed=1234, steps=3, guidance=6.0, width=64, height=48, batch_size=2, negative_prompt="blurry")
    one_node = images(cpu, with_lora(graph(sampler_name=sampler, scheduler=scheduler, **sample)))
    assert one_node.shape == (2, 48, 64, 3)
    assert np.array_equal(images(cpu, with_lora(comfy_graph(sampler, scheduler, **sample))), one_node)


def test_the_same_seed_is_the_same_image_and_the_noise_sets_it(cpu: Executor,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    first = images(cpu, graph(seed=8))
    cpu.cache.clear()
    assert np.array_equal(images(cpu, graph(seed=8)), first)
    cpu.cache.clear()
    # Swapping in seed 9's initial noise under seed 8 changes the image: the image follows the CPU draw.
    original = sigmas.initial_noise
    monkeypatch.setattr(sigmas, "initial_noise", lambda seed, shape: original(9, shape))
    assert differs(images(cpu, graph(seed=8)), first) > 1


def test_the_estimate_scales_with_size_batch_guidance_and_dtype() -> None:
    def need(size: int, batch: int = 1, cfg: bool = True, element_size: int = 4) -> int:
        return activation_bytes("sd15", size, size, batch, cfg, element_size)

    assert need(4096) > 3.5 * need(2048)  # large: the UNet dominates, linear in pixels
    assert need(4096, batch=2) > 1.9 * need(4096)
    assert need(4096, cfg=False) < 0.6 * need(4096)
    assert need(4096, element_size=2) < 0.6 * need(4096)
    assert need(2048) < 2.5 * need(1024)  # the VAE decodes 1 Mpixel tiles above 1024×1024: its part stops growing
    # Measured on the full-size SD1.5 UNet and VAE (bench/activations.py): 512×512 needs about 1 GiB in fp32.
    assert 0.9 * 2**30 < activation_bytes("sd15", 512, 512, 1, True, 4) < 1.5 * 2**30


def test_a_large_image_decodes_in_tiles_close_to_the_whole(cpu: Executor, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = images(cpu, graph(seed=21, width=128, height=128, steps=1))
    other = images(cpu, graph(seed=22, width=128, height=128, steps=1))
    decoder = cpu.models.resident()[0].value.pipe.vae.decoder
    calls: list[tuple[int, ...]] = []
    hook = decoder.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    try:
        monkeypatch.setattr(sampling, "TILE_ABOVE_PIXELS", 64 * 64)  # the demo VAE's tiles are 64 pixels
        cpu.cache.clear()
        tiled = images(cpu, graph(seed=21, width=128, height=128, steps=1))
    finally:
        hook.remove()
    assert len(calls) > 1 and all(shape[-1] <= 8 and shape[-2] <= 8 for shape in calls)  # latent tiles
    # Blended seams: not identical, but far closer to the whole decode than another seed's image is.
    assert 0 < differs(tiled, whole) < differs(other, whole) / 2, (differs(tiled, whole), differs(other, whole))


@pytest.mark.parametrize("tiled", [False, True])
def test_cancel_during_decode_stops_before_the_next_slice_or_tile(cpu: Executor, monkeypatch: pytest.MonkeyPatch,
                                                                  tiled: bool) -> None:
    images(cpu, graph(seed=30))  # loads the pipeline
    if tiled:
        monkeypatch.setattr(sampling, "TILE_ABOVE_PIXELS", 64 * 64)
    decoder = cpu.models.resident()[0].value.pipe.vae.decoder
    cancel = CancelToken()
    calls: list[int] = []

    def cancel_after_first(module: Any, args: Any, out: Any) -> None:
        calls.append(1)
        cancel.cancel()

    hook = decoder.register_forward_hook(cancel_after_first)
    try:
        wf = graph(seed=31, batch_size=1 if tiled else 3, width=128 if tiled else 64, height=128 if tiled else 64)
        events = Recorder()
        result = cpu.run(wf, events, cancel)
    finally:
        hook.remove()
    assert result.status == "interrupted" and result.nodes["sample"].status == "interrupted"
    assert calls == [1]  # one slice or tile decoded, then it stopped
    assert [e.node_id for e in events.of(ev.Interrupted)] == ["sample"]
    assert images(cpu, graph(seed=31)).shape == (1, 64, 64, 3)  # the pipeline still works afterwards
