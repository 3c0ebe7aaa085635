"""KSampler on SD3 and Flux (flow matching, ComfyUI's model sampling and FluxGuidance) against the diffusers
pipelines, and ComfyUI's split loaders (UNETLoader, DualCLIPLoader, VAELoader) against the folders."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodes.engine.checkpoints import load_pipeline
from nodes.engine.sigmas import initial_noise
from tests.conftest import workflow


@pytest.fixture(scope="module")
def executor(registry: Registry, demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    return Executor(registry, Settings(models_dirs=(demo_dir,), output_dir=tmp_path_factory.mktemp("out")))


def comfy_graph(checkpoint: str, cfg: float, steps: int = 3, sampler: str = "euler", scheduler: str = "simple",
                shift_node: dict[str, Any] | None = None) -> dict[str, Any]:
    lora = "tiny-flux-style" if checkpoint == "tiny-flux" else "tiny-sd3-style"
    nodes: dict[str, Any] = {
        "ckpt": {"type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "lora": {"type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                  "lora_name": f"{lora}.safetensors", "strength_model": 0.8,
                                                  "strength_clip": 1.0}},
        "pos": {"type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["lora", 1]}},
        "neg": {"type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["lora", 1]}},
        "lat": {"type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "ks": {"type": "KSampler", "inputs": {"model": ["lora", 0], "seed": 4, "steps": steps, "cfg": cfg,
                                              "sampler_name": sampler, "scheduler": scheduler,
                                              "positive": ["pos", 0], "negative": ["neg", 0],
                                              "latent_image": ["lat", 0], "denoise": 1.0}},
        "show": {"type": "Show", "inputs": {"value": ["ks", 0]}}}
    if checkpoint == "tiny-flux":
        nodes["guide"] = {"type": "FluxGuidance", "inputs": {"conditioning": ["pos", 0], "guidance": 5.0}}
        nodes["ks"]["inputs"]["positive"] = ["guide", 0]
    if shift_node:
        nodes["shift"] = {"type": shift_node["type"], "inputs": {"model": ["lora", 0], **shift_node["inputs"]}}
        nodes["ks"]["inputs"]["model"] = ["shift", 0]
    return workflow(nodes)


@pytest.mark.parametrize("checkpoint, cfg, shift_node", [
    ("tiny-flux", 1.0, None),
    ("tiny-flux", 1.0, {"type": "ModelSamplingFlux", "inputs": {"max_shift": 1.15, "base_shift": 0.5,
                                                                 "width": 1024, "height": 1024}}),
    ("tiny-sd3", 4.0, None),
    ("tiny-sd3", 4.0, {"type": "ModelSamplingSD3", "inputs": {"shift": 6.0}}),
])
def test_ksampler_equals_the_diffusers_pipeline_on_the_same_sigmas(
        executor: Executor, demo_dir: Path, checkpoint: str, cfg: float, shift_node: dict[str, Any] | None) -> None:
    """ComfyUI's graph (CLIPTextEncode, FluxGuidance, KSampler) against the family's pipeline run with the same
    sigmas, conditioning, guidance and LoRA: the same latent."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from nodes.engine.flow import FlowModel
    from nodes.engine.sigmas import sigmas as schedule

    result = executor.run(comfy_graph(checkpoint, cfg, shift_node=shift_node))
    assert result.status == "ok", [p.message for p in result.errors]
    ours = result.nodes["show"].outputs["value"].samples
    family = checkpoint.removeprefix("tiny-")
    recipe = (result.nodes.get("shift") or result.nodes["lora"]).outputs["MODEL"]
    assert recipe.sampling_shift == (0.0 if shift_node is None else pytest.approx(
        {"flux": 1.15, "sd3": 6.0}[family]))
    sigmas = schedule("simple", FlowModel.for_family(family, recipe.sampling_shift), 3)  # type: ignore[arg-type]

    pipe = load_pipeline(demo_dir / "checkpoints" / checkpoint)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe.load_lora_weights(str(demo_dir / "loras" / f"tiny-{family}-style.safetensors"), adapter_name="s")
    pipe.set_adapters(["s"], [0.8])
    noise = initial_noise(4, (1, 16, 8, 8))
    kwargs: dict[str, Any] = {"guidance_scale": cfg}
    if family == "flux":
        noise = pipe._pack_latents(noise, 1, 16, 8, 8)
        kwargs["guidance_scale"] = 5.0
    latents = pipe(prompt="a red fox", num_inference_steps=3, width=64, height=64, latents=noise,
                   sigmas=sigmas[:-1].tolist(), output_type="latent", **kwargs).images
    if family == "flux":
        latents = pipe._unpack_latents(latents, 64, 64, pipe.vae_scale_factor)
    torch.testing.assert_close(ours, latents.float(), atol=1e-4, rtol=1e-4)


def test_flux_shift_is_diffusers_resolution_dependent_shift() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from nodes.engine.flow import FlowModel, flux_shift

    mu = flux_shift(512, 768)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    scheduler.set_timesteps(sigmas=[0.9, 0.5, 0.1], mu=mu)
    ours = FlowModel.for_family("flux", mu).sigma(torch.tensor([0.9, 0.5, 0.1]))
    torch.testing.assert_close(ours, scheduler.sigmas[:-1].float())


@pytest.mark.parametrize("change, where", [({"sampler": "euler_ancestral"}, "sampler_name"),
                                           ({"shift_node": {"type": "ModelSamplingSD3", "inputs": {"shift": 3.0}}},
                                            "model")])
def test_flux_ksampler_inputs_it_cannot_honour_are_node_errors(executor: Executor, change: dict[str, Any],
                                                              where: str) -> None:
    result = executor.run(comfy_graph("tiny-flux", 1.0, **change))
    assert result.status == "error"
    assert result.errors[0].input == where


def test_unet_loader_transformer_file_with_a_folders_clip_equals_the_folder(executor: Executor) -> None:
    """The split (UNETLoader + the CLIP from a folder) samples exactly as the folder's own MODEL does."""
    whole = comfy_graph("tiny-flux", 1.0)
    split = comfy_graph("tiny-flux", 1.0)
    split["nodes"]["unet"] = {"type": "UNETLoader", "inputs": {"unet_name": "tiny-flux.safetensors"}}
    split["nodes"]["lora2"] = {"type": "LoraLoaderModelOnly", "inputs": {"model": ["unet", 0], "strength_model": 0.8,
                                                                         "lora_name": "tiny-flux-style.safetensors"}}
    split["nodes"]["ks"]["inputs"]["model"] = ["lora2", 0]
    results = [executor.run(wf) for wf in (whole, split)]
    assert all(r.status == "ok" for r in results), [r.errors for r in results]
    a, b = (r.nodes["show"].outputs["value"].samples for r in results)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_sample_on_a_transformer_only_model_says_what_is_missing(executor: Executor) -> None:
    result = executor.run(workflow({
        "unet": {"type": "UNETLoader", "inputs": {"unet_name": "tiny-flux.safetensors"}},
        "sample": {"type": "Sample", "inputs": {"model": ["unet", 0], "prompt": "a fox", "steps": 2, "width": 64,
                                                "height": 64, "guidance": 3.5}},
        "show": {"type": "Show", "inputs": {"value": ["sample", 0]}}}))
    assert result.status == "error"
    assert (result.errors[0].input, result.errors[0].code) == ("model", "wrong_model")
    assert "text encoders" in result.errors[0].message


def test_flux_from_four_files_equals_the_folder(executor: Executor) -> None:
    """ComfyUI's usual Flux graph (UNETLoader + DualCLIPLoader + VAELoader) makes the folder's image exactly."""
    import nodegraph.workflow as workflow_file

    split = workflow_file.load(Path(__file__).parents[2] / "workflows" / "comfyui" / "flux_split.json")
    folder = copy.deepcopy(split)
    folder["nodes"]["11"] = {"type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-flux"}}
    for node in ("6", "7"):
        folder["nodes"][node]["inputs"]["clip"] = ["11", 1]
    folder["nodes"]["8"]["inputs"]["vae"] = ["11", 2]
    images = []
    for wf in (split, folder):
        wf["nodes"]["show"] = {"type": "Show", "inputs": {"value": ["8", 0]}}
        result = executor.run(wf)
        assert result.status == "ok", [p.message for p in result.errors]
        images.append(result.nodes["show"].outputs["value"].pixels)
    assert np.array_equal(*images)
    assert images[0].std() > 1


def test_split_loaders_name_the_file_that_does_not_fit(executor: Executor, demo_dir: Path, tmp_path: Path) -> None:
    both_clip = executor.run(workflow({
        "c": {"type": "DualCLIPLoader", "inputs": {"clip_name1": "tiny-flux-clip_l.safetensors",
                                                   "clip_name2": "tiny-flux-clip_l.safetensors"}},
        "s": {"type": "Show", "inputs": {"value": ["c", 0]}}}))
    assert (both_clip.errors[0].input, both_clip.errors[0].code) == ("clip_name2", "wrong_model")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "t5.safetensors").symlink_to(demo_dir / "text_encoders" / "tiny-flux-t5.safetensors")
    runner = Executor(executor.registry, Settings(models_dirs=(tmp_path,), output_dir=tmp_path / "out"))
    not_a_vae = runner.run(workflow({"v": {"type": "VAELoader", "inputs": {"vae_name": "t5.safetensors"}},
                                     "s": {"type": "Show", "inputs": {"value": ["v", 0]}}}))
    assert (not_a_vae.errors[0].input, not_a_vae.errors[0].code) == ("vae_name", "bad_checkpoint")
    assert "not a VAE" in not_a_vae.errors[0].message
