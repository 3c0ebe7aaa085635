"""The bundled demo models: reproducible, loadable, the single file equal to the folder, every LoRA live.

pytest tests/nodes/test_demo_models.py
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers is imported: a missing file must fail, not retry

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nodes.engine.checkpoints import load_pipeline
from nodes.engine.clip_tokenizers import demo_vocab_size
from nodes.engine.demo_models import (
    DEMO_LORAS,
    MANIFEST_NAME,
    build_sd15_pipeline,
    build_sdxl_pipeline,
    demo_model_paths,
    make_demo_models,
    write_single_file,
)
from nodes.engine.demo_transformers import DEMO_TRANSFORMER_LORAS

SD15_LORAS = [name for name, spec in DEMO_LORAS.items() if spec.model == "sd15"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo-models")
    make_demo_models(root)
    return root


@pytest.fixture(scope="module")
def sd15(models: Path) -> Any:
    pipe = load_pipeline(models / "checkpoints" / "tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd15_image(sd15: Any) -> np.ndarray:
    return generate(sd15)


@pytest.fixture(scope="module")
def sdxl(models: Path) -> Any:
    pipe = load_pipeline(models / "checkpoints" / "tiny-sdxl")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_image(sdxl: Any) -> np.ndarray:
    return generate(sdxl)


def generate(pipe: Any, prompt: str = "a photo of a cat", seed: int = 0) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    images = pipe(prompt, num_inference_steps=4, height=64, width=64, generator=generator, output_type="np").images
    return np.asarray(images)


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------- files


def test_writes_every_model_small(models: Path) -> None:
    paths = make_demo_models(models)
    assert paths == demo_model_paths(models)
    assert all(p.exists() for p in paths)
    names = [*DEMO_LORAS, *DEMO_TRANSFORMER_LORAS]
    assert {p.name for p in (models / "loras").iterdir()} == {f"{name}.safetensors" for name in names}
    for folder in ("tiny-sd15", "tiny-sdxl", "tiny-flux", "tiny-sd3"):
        assert (models / "checkpoints" / folder / "model_index.json").is_file()
        # Weights as safetensors only: nothing that would need unpickling.
        assert not [p for p in (models / "checkpoints" / folder).rglob("*") if p.suffix in (".bin", ".ckpt")]
    total = sum(p.stat().st_size for p in models.rglob("*") if p.is_file())
    assert total < 40 * 2**20


def test_second_call_only_checks_the_manifest(models: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in models.rglob("*") if p.is_file()}
    start = time.perf_counter()
    make_demo_models(models)
    assert time.perf_counter() - start < 0.5
    assert {p: p.stat().st_mtime_ns for p in models.rglob("*") if p.is_file()} == before


def test_same_seed_gives_identical_bytes(models: Path, tmp_path: Path) -> None:
    make_demo_models(tmp_path)
    assert all_files(tmp_path) == all_files(models)


def test_other_seed_regenerates_and_a_missing_file_is_restored(models: Path, tmp_path: Path) -> None:
    make_demo_models(tmp_path, seed=1)
    ours, theirs = all_files(tmp_path), all_files(models)
    weights = [name for name in theirs if name.endswith(".safetensors")]
    assert all(ours[name] != theirs[name] for name in weights)
    assert json.loads(ours[MANIFEST_NAME])["seed"] == 1

    (tmp_path / "loras" / "tiny-sd15-style.safetensors").unlink()
    make_demo_models(tmp_path, seed=1)
    assert all_files(tmp_path) == ours


def test_building_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_sd15_pipeline(0)
    assert torch.equal(torch.rand(4), expected)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_both_folders_make_images(sd15_image: np.ndarray, sdxl_image: np.ndarray) -> None:
    for image in (sd15_image, sdxl_image):
        assert image.shape == (1, 64, 64, 3)
        assert np.isfinite(image).all() and image.std() > 0.05


def test_tokenizer_is_a_working_clip_bpe(sd15: Any) -> None:
    tokenizer = sd15.tokenizer
    ids = tokenizer("A photo of a cat").input_ids
    assert len(tokenizer) == demo_vocab_size() == sd15.text_encoder.config.vocab_size
    assert ids[0] == tokenizer.bos_token_id == sd15.text_encoder.config.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id == sd15.text_encoder.config.eos_token_id
    assert len(ids) == 2 + 5  # the demo vocabulary knows these five words as whole tokens
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    # Unknown words and any unicode fall back to byte tokens instead of failing.
    assert tokenizer.decode(tokenizer("zebra Ünïcode 42").input_ids, skip_special_tokens=True) == "zebra ünïcode 4 2"
    padded = tokenizer("x " * 200, padding="max_length", truncation=True, max_length=tokenizer.model_max_length)
    assert len(padded.input_ids) == tokenizer.model_max_length == 77


def test_sdxl_has_two_distinct_text_encoders(sdxl: Any) -> None:
    assert sdxl.unet.config.addition_embed_type == "text_time"
    widths = (sdxl.text_encoder.config.hidden_size, sdxl.text_encoder_2.config.hidden_size)
    assert sdxl.unet.config.cross_attention_dim == sum(widths)
    assert widths[0] != widths[1]
    assert sdxl.tokenizer_2.pad_token == "!"  # as SDXL's OpenCLIP tokenizer


def test_single_file_uses_the_original_key_layout(models: Path) -> None:
    with safe_open(models / "checkpoints" / "tiny-sd15.safetensors", "pt") as f:
        keys = list(f.keys())
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys)
    assert all(any(k.startswith(p) for k in keys) for p in prefixes)
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in keys  # upsampler after attention
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in keys


def test_single_file_equals_folder(models: Path, sd15: Any, sd15_image: np.ndarray, tmp_path: Path) -> None:
    single = load_pipeline(models / "checkpoints" / "tiny-sd15.safetensors", cache_dir=tmp_path)
    single.set_progress_bar_config(disable=True)
    for component in ("unet", "vae", "text_encoder"):
        assert state_dicts_equal(getattr(sd15, component), getattr(single, component)), component
    assert type(single.scheduler) is type(sd15.scheduler)
    assert single.tokenizer("a red house").input_ids == sd15.tokenizer("a red house").input_ids
    np.testing.assert_array_equal(generate(single), sd15_image)


def test_sdxl_single_file_equals_folder(sdxl: Any, sdxl_image: np.ndarray, tmp_path: Path) -> None:
    path = write_single_file(build_sdxl_pipeline(0), tmp_path / "tiny-sdxl.safetensors")
    single = load_pipeline(path, cache_dir=tmp_path / "cache")
    single.set_progress_bar_config(disable=True)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert state_dicts_equal(getattr(sdxl, component), getattr(single, component)), component
    np.testing.assert_array_equal(generate(single), sdxl_image)


# ---------------------------------------------------------------------------------------------- LoRAs


def lora_file(models: Path, name: str) -> Path:
    return models / "loras" / f"{name}.safetensors"


@pytest.mark.parametrize("name", SD15_LORAS)
def test_each_lora_loads_and_changes_the_image(models: Path, sd15: Any, sd15_image: np.ndarray, name: str) -> None:
    sd15.load_lora_weights(str(lora_file(models, name)), adapter_name="probe")
    try:
        image = generate(sd15)
    finally:
        sd15.delete_adapters("probe")
    change = np.abs(image - sd15_image)
    assert np.isfinite(image).all()
    assert change.mean() > 0.01  # visible ...
    assert change.mean() < 0.15 and image.std() > 0.05  # ... without blowing up


def test_sdxl_lora_changes_the_image(models: Path, sdxl: Any, sdxl_image: np.ndarray) -> None:
    sdxl.load_lora_weights(str(lora_file(models, "tiny-sdxl-style")), adapter_name="probe")
    try:
        assert np.abs(generate(sdxl) - sdxl_image).mean() > 0.01
    finally:
        sdxl.delete_adapters("probe")


def test_lora_files_have_the_promised_shape(models: Path) -> None:
    for name, spec in DEMO_LORAS.items():
        path = lora_file(models, name)
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
        ups = [v for k, v in tensors.items() if k.endswith(("lora_B.weight", "lora_up.weight"))]
        downs = [v for k, v in tensors.items() if k.endswith(("lora_A.weight", "lora_down.weight"))]
        assert ups and all(u.abs().max() > 0 for u in ups), name  # lora_B is not the zero of a fresh adapter
        assert {d.shape[0] for d in downs} == {spec.rank}, name
        if spec.kohya:
            assert all(k.startswith("lora_unet_") for k in tensors)
            assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {spec.alpha}
        else:
            # Without adapter metadata diffusers would silently use alpha = rank.
            adapter = json.loads(metadata["lora_adapter_metadata"])
            assert adapter["unet.r"] == spec.rank and adapter["unet.lora_alpha"] == spec.alpha
            assert ("text_encoder.lora_alpha" in adapter) == bool(spec.text_targets)


def unet_modules(models: Path, name: str) -> set[str]:
    keys = load_file(lora_file(models, name)).keys()
    return {k.split(".lora_")[0] for k in keys if k.startswith("unet.")}


def test_subset_and_rank_variants_target_the_style_layers(models: Path) -> None:
    style = unet_modules(models, "tiny-sd15-style")
    assert unet_modules(models, "tiny-sd15-subset") < style
    for name in ("tiny-sd15-alpha", "tiny-sd15-rank2", "tiny-sd15-rank8", "tiny-sd15-te"):
        assert unet_modules(models, name) == style, name


def test_alpha_lora_is_the_style_lora_at_half_strength(models: Path, sd15: Any) -> None:
    sd15.load_lora_weights(str(lora_file(models, "tiny-sd15-style")), adapter_name="style")
    sd15.set_adapters(["style"], [0.5])
    half = generate(sd15)
    sd15.delete_adapters("style")
    sd15.load_lora_weights(str(lora_file(models, "tiny-sd15-alpha")), adapter_name="alpha")
    try:
        np.testing.assert_allclose(generate(sd15), half, atol=1e-6)
    finally:
        sd15.delete_adapters("alpha")


def test_text_encoder_lora_changes_the_prompt_embedding(models: Path, sd15: Any) -> None:
    def embed() -> torch.Tensor:
        return sd15.encode_prompt("a photo of a cat", "cpu", 1, False)[0]

    before = embed()
    for name, changes in (("tiny-sd15-style", False), ("tiny-sd15-te", True)):
        sd15.load_lora_weights(str(lora_file(models, name)), adapter_name="probe")
        try:
            assert (not torch.equal(embed(), before)) == changes, name
        finally:
            sd15.delete_adapters("probe")


def test_kohya_file_equals_its_peft_translation(models: Path, sd15: Any, tmp_path: Path) -> None:
    """The same weights in the two formats give the same image: diffusers' Kohya conversion is exact."""
    kohya = load_file(lora_file(models, "tiny-sd15-kohya"))
    names = {name.replace(".", "_"): name for name, _ in sd15.unet.named_modules()}
    peft: dict[str, torch.Tensor] = {}
    for key, value in kohya.items():
        module, _, kind = key.removeprefix("lora_unet_").partition(".")
        if kind != "alpha":
            peft[f"unet.{names[module]}.{'lora_A' if kind.startswith('lora_down') else 'lora_B'}.weight"] = value
    spec = DEMO_LORAS["tiny-sd15-kohya"]
    targets = sorted({k.removeprefix("unet.").split(".lora_")[0] for k in peft})
    adapter = {"unet.r": spec.rank, "unet.lora_alpha": spec.alpha, "unet.target_modules": targets}
    save_file(peft, tmp_path / "peft.safetensors", metadata={"lora_adapter_metadata": json.dumps(adapter)})

    images = []
    for path in (lora_file(models, "tiny-sd15-kohya"), tmp_path / "peft.safetensors"):
        sd15.load_lora_weights(str(path), adapter_name="probe")
        try:
            images.append(generate(sd15))
        finally:
            sd15.delete_adapters("probe")
    np.testing.assert_allclose(images[0], images[1], atol=1e-6)
