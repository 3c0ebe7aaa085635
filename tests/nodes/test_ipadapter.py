"""IP-Adapter: IPAdapterApply samples as diffusers' `load_ip_adapter` + `set_ip_adapter_scale` do on the same
weights (through KSampler's sampling maths), a recipe without it afterwards equals a fresh model, bad files
and adapters for another model are named."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nodegraph.cli import main
from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodes.engine.checkpoints import load_pipeline
from tests.conftest import workflow

ROOT = Path(__file__).parents[2]
ADAPTER = "tiny-sd15-ipadapter.safetensors"
VISION = "tiny-clip-vision.safetensors"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An input folder with a 32×32 picture (the demo encoder's size: no resize, so CLIPImageProcessor agrees)."""
    folder = tmp_path_factory.mktemp("input")
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "face.png")
    return folder


@pytest.fixture(scope="module")
def shared(registry: Registry, demo_dir: Path, inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    return Executor(registry, Settings(models_dirs=(demo_dir,), input_dir=inputs,
                                       output_dir=tmp_path_factory.mktemp("out")))


def graph(weight: float | None, checkpoint: str = "tiny-sd15", adapter: str = ADAPTER,
          lora: str | None = None) -> dict[str, Any]:
    nodes: dict[str, Any] = {
        "ckpt": {"type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "pos": {"type": "CLIPTextEncode", "inputs": {"text": "a castle", "clip": ["ckpt", "CLIP"]}},
        "neg": {"type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", "CLIP"]}},
        "empty": {"type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "show_pos": {"type": "Show", "inputs": {"value": ["pos", 0]}},
        "show_neg": {"type": "Show", "inputs": {"value": ["neg", 0]}},
    }
    model = ["ckpt", "MODEL"]
    if lora is not None:
        nodes["lora"] = {"type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": lora,
                                                                   "strength_model": 1.0}}
        model = ["lora", 0]
    if weight is not None:
        nodes["ipa"] = {"type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": adapter}}
        nodes["vision"] = {"type": "CLIPVisionLoader", "inputs": {"clip_name": VISION}}
        nodes["image"] = {"type": "LoadImage", "inputs": {"image": "face.png"}}
        nodes["apply"] = {"type": "IPAdapterApply", "inputs": {"model": model, "ipadapter": ["ipa", 0],
                          "clip_vision": ["vision", 0], "image": ["image", "IMAGE"], "weight": weight}}
        model = ["apply", 0]
    nodes["sample"] = {"type": "KSampler", "inputs": {
        "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0], "seed": 4,
        "steps": 4, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    nodes["show"] = {"type": "Show", "inputs": {"value": ["sample", 0]}}
    return workflow(nodes)


def run(executor: Executor, weight: float | None, **kwargs: Any) -> Any:
    result = executor.run(graph(weight, **kwargs))
    assert result.status == "ok", result.errors
    return result


def latent(executor: Executor, weight: float | None, **kwargs: Any) -> torch.Tensor:
    samples: torch.Tensor = run(executor, weight, **kwargs).nodes["show"].outputs["value"].samples
    return samples


def encoder(demo_dir: Path) -> Any:
    """The demo CLIP vision encoder as transformers builds it from its stated config."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with safe_open(str(demo_dir / "clip_vision" / VISION), framework="pt") as f:
        config = json.loads(f.metadata()["clip_vision_config"])
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    model.load_state_dict(load_file(demo_dir / "clip_vision" / VISION))
    return model.eval()


def image_embeds(result: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The image embeddings IPAdapterApply put in its MODEL recipe: (negative, positive)."""
    from nodes.engine import ip_adapter

    positive, negative = ip_adapter.embeddings(result.nodes["apply"].outputs["MODEL"].ip_adapter)
    return negative, positive


def reference(demo_dir: Path, inputs: Path, weight: float | None, family: str = "sd15", lora: str | None = None,
              conds: tuple[Any, Any] | None = None, adapters: Path | None = None, adapter: str | None = None,
              pictures: tuple[str, ...] = ("face.png",), ours: Any = None) -> torch.Tensor:
    """diffusers by hand on a freshly loaded pipeline: `load_lora_weights`, `load_ip_adapter` from the file,
    `set_ip_adapter_scale`, the image embeddings from the pipeline's own `prepare_ip_adapter_image_embeds`
    (transformers' CLIPImageProcessor and encoder; several pictures: a list for the one adapter), and a plain
    Euler loop over KSampler's `normal` schedule. SD1.5 prompts from `encode_prompt`; SDXL's from `conds`
    (CLIPTextEncode's, tested against diffusers elsewhere) with its size conditioning.

    `ours` (a run of `graph`): its recipe's image embeddings must equal diffusers' to float rounding, and then
    stand in for them. The two encoders agree to about one ulp, not bitwise (our encoder's weights are views of
    the memory-mapped file, at offsets the header's length decides, and the CPU's matrix kernels round
    unaligned operands differently), and this tiny random UNet turns a 2e-7 change of the embeddings into 2e-3
    of the latent after four steps: so the encoder and the sampling are compared each on equal inputs."""
    from transformers import CLIPImageProcessor

    from nodes.engine.samplers import CFGDenoiser
    from nodes.engine.sigmas import DiscreteModel, initial_noise, noised_latent, sigmas

    pipe = load_pipeline(demo_dir / "checkpoints" / f"tiny-{family}")
    if lora is not None:
        pipe.load_lora_weights(str(demo_dir / "loras" / lora), adapter_name="l")
    image: dict[str, torch.Tensor] = {}
    if weight is not None:
        pipe.load_ip_adapter(str(adapters or demo_dir / "ipadapter"), subfolder="", image_encoder_folder=None,
                             weight_name=adapter or f"tiny-{family}-ipadapter.safetensors")
        pipe.set_ip_adapter_scale(weight)
        pipe.image_encoder, pipe.feature_extractor = encoder(demo_dir), CLIPImageProcessor(size=32, crop_size=32)
        with torch.inference_mode():
            [both] = pipe.prepare_ip_adapter_image_embeds([[Image.open(inputs / p) for p in pictures]], None, "cpu",
                                                          1, True)
        if ours is not None:
            mine = torch.cat(image_embeds(ours)).reshape(both.shape)
            torch.testing.assert_close(mine, both, atol=1e-6, rtol=1e-5)
            both = mine
        image = dict(zip(("uncond", "cond"), both.chunk(2), strict=True))
    discrete = DiscreteModel.from_config(pipe.scheduler.config)
    schedule = sigmas("normal", discrete, 4, sampler="euler")
    size = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    with torch.inference_mode():
        if conds is None:
            conds = tuple(pipe.encode_prompt(text, "cpu", 1, False)[0] for text in ("a castle", ""))
        cond, uncond = ({"embeds": c if isinstance(c, torch.Tensor) else c.embeds,
                         **({"pooled": c.pooled} if family == "sdxl" else {}),
                         **({"image_embeds": image[side]} if image else {})}
                        for c, side in zip(conds, ("cond", "uncond"), strict=True))

        def eps(x: torch.Tensor, t: torch.Tensor, c: dict[str, Any]) -> torch.Tensor:
            added: dict[str, Any] = {"image_embeds": [c["image_embeds"]]} if image else {}
            if family == "sdxl":
                added.update(text_embeds=c["pooled"], time_ids=size.expand(len(x), -1))
            return pipe.unet(x, t, encoder_hidden_states=c["embeds"], added_cond_kwargs=added or None).sample

        guided = CFGDenoiser(discrete, eps, cond, uncond, 7.0)
        x = noised_latent(discrete, torch.zeros(1, 4, 8, 8), initial_noise(4, (1, 4, 8, 8)), schedule)
        for sigma, down_to in zip(schedule[:-1], schedule[1:], strict=True):
            x = x + (x - guided(x, sigma)) / sigma * (down_to - sigma)
    return x


def test_ipadapter_samples_as_diffusers_load_ip_adapter(shared: Executor, demo_dir: Path, inputs: Path) -> None:
    plain = reference(demo_dir, inputs, None)
    for weight in (0.8, 0.3):  # the second only rescales the loaded adapter
        ours = run(shared, weight)
        want = reference(demo_dir, inputs, weight, ours=ours)
        torch.testing.assert_close(ours.nodes["show"].outputs["value"].samples, want, atol=1e-5, rtol=1e-5)
        assert (want - plain).abs().mean() > 0.05  # the image prompt really changes the result
    # A recipe without the adapter afterwards, on the same resident: a fresh model's result (reconciler invariant).
    torch.testing.assert_close(latent(shared, None), plain, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def sdxl_adapter(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with an IP-Adapter for tiny-sdxl (not bundled: the demo set has a size limit)."""
    from nodes.engine.demo_ipadapter import write_adapter

    root = tmp_path_factory.mktemp("sdxl-models")
    unet = load_pipeline(demo_dir / "checkpoints" / "tiny-sdxl").unet
    write_adapter(root / "ipadapter" / "tiny-sdxl-ipadapter.safetensors", 0, "sdxl", unet)
    return root


def test_ipadapter_on_sdxl_equals_diffusers(registry: Registry, demo_dir: Path, inputs: Path, sdxl_adapter: Path,
                                            tmp_path: Path) -> None:
    executor = Executor(registry, Settings(models_dirs=(sdxl_adapter, demo_dir), input_dir=inputs,
                                           output_dir=tmp_path))
    result = run(executor, 0.7, checkpoint="tiny-sdxl", adapter="tiny-sdxl-ipadapter.safetensors")
    conds = tuple(result.nodes[f"show_{side}"].outputs["value"].entries[0] for side in ("pos", "neg"))
    want = reference(demo_dir, inputs, 0.7, family="sdxl", conds=conds, adapters=sdxl_adapter / "ipadapter",
                     ours=result)
    torch.testing.assert_close(result.nodes["show"].outputs["value"].samples, want, atol=1e-5, rtol=1e-5)
    assert (want - reference(demo_dir, inputs, None, family="sdxl", conds=conds)).abs().mean() > 0.05


def test_ipadapter_with_a_lora_equals_diffusers(shared: Executor, demo_dir: Path, inputs: Path) -> None:
    lora = "tiny-sd15-style.safetensors"
    ours = run(shared, 0.8, lora=lora)
    want = reference(demo_dir, inputs, 0.8, lora=lora, ours=ours)
    torch.testing.assert_close(ours.nodes["show"].outputs["value"].samples, want, atol=1e-5, rtol=1e-5)
    assert (want - reference(demo_dir, inputs, 0.8)).abs().mean() > 0.05  # the LoRA counts too


def test_reconciler_unloads_the_adapter_with_a_lora_strength_change(demo_dir: Path) -> None:
    """A LoRA strength change goes the in-place way; the IP-Adapter still leaves, and the UNet is a fresh one."""
    from nodes.engine import ip_adapter
    from nodes.engine.recipe import Adapter, IPAdapter, ModelRecipe
    from nodes.engine.reconcile import reconcile
    from nodes.engine.resident import Resident

    folder = demo_dir / "checkpoints" / "tiny-sd15"
    base = ModelRecipe(str(folder), "f", "sd15", "fp32")
    lora = str(demo_dir / "loras" / "tiny-sd15-style.safetensors")
    pipe = load_pipeline(folder)
    resident = Resident.fresh(pipe, base)
    use = IPAdapter(str(demo_dir / "ipadapter" / ADAPTER), "x", 0.5, **ip_adapter.to_recipe(torch.ones(1, 32), None))
    with_both = base.then(Adapter("s", lora, "1", strength=1.0))
    assert "ip_adapter_load" in reconcile(resident, replace(with_both, ip_adapter=use))
    assert pipe.unet.encoder_hid_proj is not None
    actions = reconcile(resident, base.then(Adapter("s", lora, "1", strength=0.5)))
    assert "ip_adapter_unload" in actions and pipe.unet.encoder_hid_proj is None
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert pipe.unet.config.encoder_hid_dim_type is None


def test_a_failed_load_leaves_a_fresh_unet(demo_dir: Path, tmp_path: Path) -> None:
    """An adapter whose image projection does not load (after diffusers has set the IP attention processors)."""
    from nodes.engine import ip_adapter
    from nodes.engine.recipe import IPAdapter, ModelRecipe
    from nodes.engine.reconcile import ReconcileError, reconcile
    from nodes.engine.resident import Resident

    state = load_file(demo_dir / "ipadapter" / ADAPTER)
    state["image_proj.norm.weight"] = torch.ones(7)
    save_file(state, tmp_path / "broken.safetensors")
    folder = demo_dir / "checkpoints" / "tiny-sd15"
    base = ModelRecipe(str(folder), "f", "sd15", "fp32")
    pipe = load_pipeline(folder)
    resident = Resident.fresh(pipe, base)
    broken = IPAdapter(str(tmp_path / "broken.safetensors"), "x", 1.0, **ip_adapter.to_recipe(torch.ones(1, 32), None))
    with pytest.raises(ReconcileError, match="broken.safetensors"):
        reconcile(resident, replace(base, ip_adapter=broken))
    assert pipe.unet.encoder_hid_proj is None and resident.ip_adapter is None and not resident.broken
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_bad_adapter_files_are_named(registry: Registry, demo_dir: Path, inputs: Path, tmp_path: Path) -> None:
    (tmp_path / "ipadapter").mkdir()
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "ipadapter" / "odd.safetensors")
    state = load_file(demo_dir / "ipadapter" / ADAPTER)
    state.pop("ip_adapter.1.to_k_ip.weight")
    state.pop("ip_adapter.1.to_v_ip.weight")
    save_file(state, tmp_path / "ipadapter" / "short.safetensors")
    (tmp_path / "clip_vision").mkdir()
    save_file(load_file(demo_dir / "clip_vision" / VISION), tmp_path / "clip_vision" / "bare.safetensors")
    executor = Executor(registry, Settings(models_dirs=(tmp_path, demo_dir), input_dir=inputs,
                                           output_dir=tmp_path / "out"))
    result = executor.run(graph(1.0, adapter="odd.safetensors"))
    assert [(e.node_id, e.input, e.code) for e in result.errors] == [("ipa", "ipadapter_file", "bad_ipadapter")]
    assert "not an IP-Adapter" in result.errors[0].message
    result = executor.run(graph(1.0, adapter="short.safetensors"))
    assert [(e.node_id, e.input, e.code) for e in result.errors] == [("apply", "ipadapter", "wrong_model")]
    bare = graph(1.0)
    bare["nodes"]["vision"]["inputs"]["clip_name"] = "bare.safetensors"  # no config in its metadata
    result = executor.run(bare)
    assert [(e.node_id, e.input, e.code) for e in result.errors] == [("vision", "clip_name", "bad_clip_vision")]
    assert "clip_vision_config" in result.errors[0].message
    result = executor.run(graph(1.0, checkpoint="tiny-sdxl"))  # the SD1.5 adapter on SDXL
    assert [(e.node_id, e.input, e.code) for e in result.errors] == [("apply", "ipadapter", "wrong_model")]
    assert ADAPTER in result.errors[0].message


def test_ipadapter_workflow_runs_headless(demo_dir: Path, demo_input: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(ROOT / "workflows" / "ipadapter.json"), "--models-dir", str(demo_dir), "--input-dir",
                 str(demo_input), "--output-dir", str(tmp_path), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["status"] == "ok", result["errors"]
    assert result["files"]
