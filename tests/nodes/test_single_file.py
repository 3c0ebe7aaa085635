"""The direct single-file load (nodes/engine/single_file.py) gives exactly what diffusers' `from_single_file` gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from nodes.engine import single_file
from nodes.engine.checkpoints import load_pipeline, read_header
from nodes.engine.demo_models import build_sd15_pipeline, write_single_file
from nodes.engine.single_file_configs import single_file_config_dir


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo SD1.5 pipeline as one ldm-layout file stored in float32 and one stored in float16."""
    root = tmp_path_factory.mktemp("single-files")
    pipe = build_sd15_pipeline(0)
    out = {"fp32": write_single_file(pipe, root / "sd15-fp32.safetensors")}
    out["fp16"] = write_single_file(pipe.to(torch.float16), root / "sd15-fp16.safetensors")
    return out


def through_diffusers(monkeypatch: pytest.MonkeyPatch, path: Path, dtype: torch.dtype, cache: Path,
                      encoders: torch.dtype | None = None) -> Any:
    with monkeypatch.context() as patch:
        patch.setattr(single_file, "load_sd15_file", lambda *args: None)
        return load_pipeline(path, dtype, cache_dir=cache, text_encoder_dtype=encoders)


def direct(monkeypatch: pytest.MonkeyPatch, path: Path, dtype: torch.dtype, cache: Path,
           encoders: torch.dtype | None = None) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("from_single_file was called: the direct path was not taken")

    with monkeypatch.context() as patch:
        patch.setattr(StableDiffusionPipeline, "from_single_file", refuse)
        return load_pipeline(path, dtype, cache_dir=cache, text_encoder_dtype=encoders)


def assert_same_pipeline(ours: Any, theirs: Any) -> None:
    assert type(ours) is type(theirs)
    for name in ("unet", "vae", "text_encoder"):
        mine, reference = getattr(ours, name), getattr(theirs, name)
        assert type(mine) is type(reference)
        assert dict(mine.config) == dict(reference.config) if name != "text_encoder" else (
            mine.config.to_dict() == reference.config.to_dict())
        assert mine.training == reference.training
        state, expected = mine.state_dict(), reference.state_dict()
        assert state.keys() == expected.keys(), name
        for key, value in expected.items():
            assert state[key].dtype == value.dtype and state[key].shape == value.shape, f"{name}.{key}"
            assert torch.equal(state[key], value), f"{name}.{key}"
        assert [p.requires_grad for p in mine.parameters()] == [p.requires_grad for p in reference.parameters()]
    assert type(ours.scheduler) is type(theirs.scheduler)
    assert dict(ours.scheduler.config) == dict(theirs.scheduler.config)
    assert ours.tokenizer("a red bottle").input_ids == theirs.tokenizer("a red bottle").input_ids
    assert ours.tokenizer.model_max_length == theirs.tokenizer.model_max_length


def image(pipe: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(3)
    out = pipe("a red bottle", num_inference_steps=2, height=64, width=64, generator=generator, output_type="pt")
    return out.images


@pytest.mark.parametrize(("stored", "dtype", "encoders"), [
    ("fp32", torch.float32, None),
    ("fp16", torch.float32, None),  # the cold-start case: a float16 file cast to float32 once
    ("fp16", torch.float16, torch.float32),  # a float16 UNet with float32 text encoders (fp16 on a CPU)
    ("fp32", torch.bfloat16, None),
])
def test_direct_load_equals_from_single_file(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stored: str, dtype: torch.dtype,
    encoders: torch.dtype | None,
) -> None:
    path = files[stored]
    theirs = through_diffusers(monkeypatch, path, dtype, tmp_path, encoders)
    ours = direct(monkeypatch, path, dtype, tmp_path, encoders)
    assert_same_pipeline(ours, theirs)
    if dtype == torch.float32:
        assert torch.equal(image(ours), image(theirs))


def test_weights_already_in_the_load_dtype_are_not_copied(files: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A float32 file loaded as float32: the parameters are views of the memory-mapped file, as with diffusers."""
    from tests.nodes.test_checkpoints import mapped_files

    pipe = direct(monkeypatch, files["fp32"], torch.float32, tmp_path)
    weights = [t for m in (pipe.unet, pipe.vae, pipe.text_encoder) for t in m.parameters()]
    assert set(mapped_files(weights)) == {str(files["fp32"].resolve())}


def without(path: Path, target: Path, drop: str = "", reshape: str = "") -> Path:
    with safe_open(str(path), "pt") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        metadata = f.metadata()
    state.pop(drop, None)
    if reshape:
        state[reshape] = state[reshape].flatten()[:-1].clone()
    save_file(state, target, metadata=metadata)
    return target


@pytest.mark.parametrize("change", [
    {"drop": "model.diffusion_model.out.2.bias"},
    {"drop": "cond_stage_model.transformer.text_model.final_layer_norm.weight"},
    {"reshape": "first_stage_model.decoder.conv_out.weight"},
])
def test_an_unexpected_layout_is_left_to_from_single_file(
        files: dict[str, Path], tmp_path: Path, change: dict[str, str]) -> None:
    path = without(files["fp32"], tmp_path / "changed.safetensors", **change)
    header = read_header(path)
    config_dir = single_file_config_dir(path, header, "sd15", tmp_path / "configs")
    assert single_file.load_sd15_file(path, header, config_dir, torch.float32, torch.float32) is None


def test_a_file_with_extra_tensors_loads_directly(files: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys no module has (EMA weights, ldm's schedule buffers) are ignored, as diffusers ignores them."""
    with safe_open(str(files["fp32"]), "pt") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    state["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None].float()
    save_file(state, tmp_path / "extra.safetensors", metadata=metadata)
    ours = direct(monkeypatch, tmp_path / "extra.safetensors", torch.float32, tmp_path)
    theirs = through_diffusers(monkeypatch, files["fp32"], torch.float32, tmp_path)
    assert_same_pipeline(ours, theirs)
