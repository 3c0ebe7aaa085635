"""lora_match's header-only reading: the same layers as the exact (torch + diffusers) reading, wherever it answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes.engine import lora_files, lora_match

FOLDERS = ["tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-flux"]


@pytest.mark.parametrize("checkpoint", FOLDERS)
def test_a_folders_headers_give_the_modules_of_its_meta_build(demo_dir: Path, checkpoint: str) -> None:
    path = str(demo_dir / "checkpoints" / checkpoint)
    assert lora_match.header_layers(path, "1") == lora_match.model_layers(path, "1")


def test_a_single_file_is_left_to_the_exact_reading(demo_dir: Path) -> None:
    assert lora_match.header_layers(str(demo_dir / "checkpoints" / "tiny-sd15.safetensors"), "1") is None


def test_peft_files_headers_give_the_layers_diffusers_makes(demo_dir: Path) -> None:
    families = {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux"}
    read = 0
    for lora in sorted((demo_dir / "loras").iterdir()):
        model = lora_match.model_layers(str(demo_dir / "checkpoints" / families[lora.name.split("-")[1]]), "1")
        quick = lora_match.peft_layers(str(lora), "1")
        if lora_files.inspect(lora).format != "peft":
            assert quick is None, lora.name  # Kohya keys: diffusers converts them
            continue
        exact = lora_files.layers(str(lora), "1", model.family, model.unet_config)
        sizes = {c: {m: (x.in_features, x.out_features) for m, x in found.items()} for c, found in exact.items()}
        assert quick == sizes, lora.name
        read += 1
    assert read >= 8


def test_a_misfit_found_in_the_headers_gets_the_exact_message(demo_dir: Path) -> None:
    ckpt = str(demo_dir / "checkpoints" / "tiny-sd15")
    lora = str(demo_dir / "loras" / "tiny-sdxl-style.safetensors")
    assert lora_match.peft_layers(lora, "1") is not None and lora_match.header_layers(ckpt, "1") is not None
    assert lora_match.mismatch(lora, "1", ckpt, "1") == (
        "layer unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k is 96→64 in the LoRA and 32→64 in "
        "tiny-sd15 (sd15)")


def exact_fit(lora: str, checkpoint: str) -> bool:
    """The torch + diffusers reading: every layer diffusers makes of the file is a module of the meta-built model."""
    model = lora_match.model_layers(checkpoint, "1")
    for component, found in lora_files.layers(lora, "1", model.family, model.unet_config).items():
        have = model.modules.get(component, {})
        for module, layer in found.items():
            size = have.get(module, have.get(module.removeprefix("text_model.")))
            if size != (layer.in_features, layer.out_features):
                return False
    return True


@pytest.mark.parametrize("checkpoint", [*FOLDERS, "tiny-sd15.safetensors"])
def test_what_the_headers_call_a_fit_is_one(demo_dir: Path, checkpoint: str) -> None:
    ckpt = str(demo_dir / "checkpoints" / checkpoint)
    settled = 0
    for lora in sorted((demo_dir / "loras").iterdir()):
        if lora_match.fits_by_headers(str(lora), "1", ckpt, "1"):
            assert exact_fit(str(lora), ckpt), lora.name
            settled += 1
    assert settled  # at least its own PEFT LoRA (the SD1.5 file: read by their ldm names)
