"""`text_encoder_device` (`--text-encoder-device`): text encoders on a device of their own, in float32 on a CPU
where the model's half type is slow, the denoiser and VAE on the compute device; per-component accounting."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nodegraph import events as ev
from nodegraph.cache import file_fingerprint
from nodegraph.executor import Executor
from nodegraph.models import ModelManager
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodes import conditioning
from nodes.engine import pipelines
from nodes.engine.checkpoints import load_pipeline
from nodes.engine.recipe import ModelRecipe
from nodes.engine.resident import Resident
from tests.conftest import Recorder
from tests.nodes.test_diffusion import differs, graph, images

TE_LORA = {"lora": "tiny-sd15-te.safetensors", "strength": 0.8}
CASES = [("tiny-flux", ()), ("tiny-sd3", ()), ("tiny-sdxl", ()), ("tiny-sd15", (TE_LORA,)),
         ("tiny-sd15.safetensors", ())]  # folders and a single file
ENCODERS = {"tiny-sd3": 3, "tiny-flux": 2, "tiny-sdxl": 2}


def executor(registry: Registry, demo_dir: Path, tmp_path: Path, **options: Any) -> Executor:
    settings = Settings(models_dirs=(demo_dir,), output_dir=tmp_path / "out")
    return Executor(registry, settings, models=ModelManager(**{"device": "cpu", **options}))


def half(checkpoint: str, loras: tuple[dict[str, Any], ...] = (), dtype: str = "bf16") -> dict[str, Any]:
    wf = graph(checkpoint, loras=loras, steps=2)
    wf["nodes"]["ckpt"]["inputs"]["dtype"] = dtype
    return wf


def components(ex: Executor) -> dict[str, tuple[str, list[str]]]:
    """Each component of the one resident pipeline: its dtype and the devices its bytes are on."""
    [entry] = ex.models.resident()
    return {c["name"]: (c["dtype"], sorted(c["bytes"])) for c in entry.to_json()["components"]}


@pytest.mark.parametrize("checkpoint, loras", CASES)
def test_cpu_text_encoders_run_in_fp32_and_equal_a_separately_loaded_fp32_encoder(
        registry: Registry, demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoint: str,
        loras: tuple[dict[str, Any], ...]) -> None:
    monkeypatch.setattr(pipelines, "cpu_has_bf16", lambda: False)  # bf16 is slow on this CPU: they run in fp32
    events = Recorder()
    image = images(executor(registry, demo_dir, tmp_path, text_encoder_device="cpu"), wf := half(checkpoint, loras),
                   events)
    all_half = images(executor(registry, demo_dir, tmp_path), wf)
    ex = executor(registry, demo_dir, tmp_path, text_encoder_device="cpu")
    images(ex, wf)
    parts = components(ex)
    denoiser = "transformer" if checkpoint in ("tiny-flux", "tiny-sd3") else "unet"
    encoders = ["text_encoder", "text_encoder_2", "text_encoder_3"][:ENCODERS.get(checkpoint, 1)]
    assert parts == {denoiser: ("bfloat16", ["cpu"]), "vae": ("bfloat16", ["cpu"]),
                     **{name: ("float32", ["cpu"]) for name in encoders}}
    if loras:  # the CLIP recipe's LoRA reconciled on the fp32 text encoder
        assert any(e.kind == "reconcile" and e.message.startswith("clip:") for e in events.of(ev.NodeInfo))

    # The reference: the same graph with its prompts encoded by the checkpoint loaded on its own in fp32.
    encode = conditioning.encode_text
    monkeypatch.setattr(conditioning, "encode_text", lambda ctx, text, clip: encode(ctx, text,
                                                                                    replace(clip, dtype="fp32")))
    plain = executor(registry, demo_dir, tmp_path)
    np.testing.assert_array_equal(image, images(plain, wf))
    assert sorted(e.name.rsplit(" ", 1)[1] for e in plain.models.resident()) == ["(bf16)", "(fp32)"]
    assert differs(image, all_half) > 0  # bf16 text encoders make another image: the comparison can fail


def test_an_fp32_model_keeps_fp32_text_encoders(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    ex = executor(registry, demo_dir, tmp_path, text_encoder_device="cpu")
    images(ex, half("tiny-sd15", dtype="fp32"))
    assert {dtype for dtype, _ in components(ex).values()} == {"float32"}


def test_moving_a_resident_leaves_text_encoders_on_their_device(demo_dir: Path) -> None:
    """Eviction to the CPU and the way back (`move`) carry the denoiser and VAE, never the text encoders.
    The meta device stands in for a GPU here: what moves there shows as no bytes."""
    path = demo_dir / "checkpoints" / "tiny-flux"
    recipe = ModelRecipe(str(path), file_fingerprint(path), "flux", "fp32")
    resident = Resident.fresh(load_pipeline(path, torch.float32), recipe, text_encoder_device="cpu")
    resident.move("meta")
    assert {c["name"]: list(c["bytes"]) for c in resident.component_memory()} == {
        "transformer": [], "vae": [], "text_encoder": ["cpu"], "text_encoder_2": ["cpu"]}
    assert resident.device == "meta" and resident.memory().keys() == {"cpu"}


def test_folder_estimate_without_text_encoders(demo_dir: Path) -> None:
    folder = str(demo_dir / "checkpoints" / "tiny-flux")
    pipe = load_pipeline(folder, torch.float32)
    sizes = {name: sum(p.numel() * 4 for p in module.parameters()) for name, module in pipe.components.items()
             if isinstance(module, torch.nn.Module)}
    rest = sizes["transformer"] + sizes["vae"]
    assert pipelines.estimate_bytes(folder, torch.float32, text_encoders=False) == pytest.approx(rest, rel=0.01)
    assert pipelines.estimate_bytes(folder, torch.float32) == pytest.approx(sum(sizes.values()), rel=0.01)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("checkpoint", ["tiny-flux", "tiny-sd15"])
def test_cuda_text_encoders_on_the_cpu_and_the_rest_on_the_gpu(registry: Registry, demo_dir: Path, tmp_path: Path,
                                                               checkpoint: str) -> None:
    wf = half(checkpoint)
    on_gpu = images(executor(registry, demo_dir, tmp_path, device="cuda"), wf)
    ex = executor(registry, demo_dir, tmp_path, device="cuda", text_encoder_device="cpu")
    image = images(ex, wf)
    parts = components(ex)
    assert {name: devices for name, (_, devices) in parts.items()} == {
        name: ["cpu"] if name.startswith("text_encoder") else ["cuda:0"] for name in parts}
    assert differs(image, on_gpu) < 2.0  # fp32 text encoders on the CPU vs bf16 ones on the GPU: close, not equal


@cuda
def test_cuda_eviction_and_reload_leave_text_encoders_on_the_cpu(registry: Registry, demo_dir: Path,
                                                                 tmp_path: Path) -> None:
    sizes = {name: pipelines.estimate_bytes(str(demo_dir / "checkpoints" / name), torch.bfloat16)
             for name in ("tiny-flux", "tiny-sd15")}
    ex = executor(registry, demo_dir, tmp_path, device="cuda", text_encoder_device="cpu",
                  vram_budget=int(max(sizes.values()) * 1.3))  # one fits, two do not
    first = images(ex, half("tiny-flux"))
    images(ex, half("tiny-sd15"))
    flux = next(e for e in ex.models.resident() if e.name.startswith("tiny-flux"))
    assert flux.device == "cpu" and {c["name"]: list(c["bytes"]) for c in flux.components}["text_encoder_2"] == ["cpu"]
    ex.cache.clear()
    np.testing.assert_array_equal(images(ex, half("tiny-flux")), first)  # moved back: the same image
    flux = next(e for e in ex.models.resident() if e.name.startswith("tiny-flux"))
    assert {c["name"]: list(c["bytes"]) for c in flux.components} == {
        "transformer": ["cuda:0"], "vae": ["cuda:0"], "text_encoder": ["cpu"], "text_encoder_2": ["cpu"]}


@cuda
def test_cuda_offloading_leaves_text_encoders_on_the_cpu(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    wf = half("tiny-flux")
    on_gpu = images(executor(registry, demo_dir, tmp_path, device="cuda"), wf)
    folder = str(demo_dir / "checkpoints" / "tiny-flux")
    rest = pipelines.estimate_bytes(folder, torch.bfloat16, text_encoders=False)
    ex = executor(registry, demo_dir, tmp_path, device="cuda", text_encoder_device="cpu", vram_budget=int(rest * 0.9))
    image = images(ex, wf)
    [entry] = ex.models.resident()
    assert entry.offloaded and entry.value.offload in ("model", "group")
    pipe = entry.value.pipe
    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(pipe, name)
        assert not hasattr(module, "_hf_hook") and {p.device.type for p in module.parameters()} == {"cpu"}
    assert differs(image, on_gpu) < 2.0
