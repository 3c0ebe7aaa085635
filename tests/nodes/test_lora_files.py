"""LoRA files: formats read from the header, the layers diffusers will make of them, and whether they fit a model."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes.engine import lora_files, lora_match
from tests.nodes import lora_fixtures


def test_a_layer_with_a_missing_matrix_is_named(tmp_path: Path) -> None:
    path = lora_fixtures.fake(tmp_path / "x.safetensors", "lora_unet_conv_in.hada_w1_a", "lora_unet_conv_in.hada_w1_b")
    with pytest.raises(lora_files.LoraFileError, match="'lora_unet_conv_in' has no hada_w2_a"):
        lora_files.inspect(path)


def test_training_script_layout_is_read_with_its_text_encoder(demo_dir: Path, tmp_path: Path) -> None:
    path = lora_fixtures.training_script_layout(demo_dir, tmp_path / "old.safetensors")
    info = lora_files.inspect(path)
    assert info.components == {"unet", "text_encoder"} and info.max_rank == 4
    reference = lora_files.layers(str(demo_dir / "loras" / "tiny-sd15-te.safetensors"), "1", "sd15")
    assert lora_files.layers(str(path), "1", "sd15") == reference  # the same layers as the PEFT file


def test_layers_are_the_modules_diffusers_makes_in_every_layout(demo_dir: Path) -> None:
    kohya = lora_files.layers(str(demo_dir / "loras" / "tiny-sd15-kohya.safetensors"), "1", "sd15")
    peft = lora_files.layers(str(demo_dir / "loras" / "tiny-sd15-style.safetensors"), "1", "sd15")
    assert set(kohya) == set(peft) == {"unet"}
    assert kohya["unet"].keys() == peft["unet"].keys()
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0" in peft["unet"]
    assert {layer.rank for layer in kohya["unet"].values()} == {8}


def test_keys_diffusers_would_drop_are_an_error(tmp_path: Path) -> None:
    path = lora_fixtures.fake(tmp_path / "x.safetensors", "unet.conv_in.lora_A.weight", "unet.conv_in.lora_B.weight",
                              "vae.encoder.conv_in.lora_A.weight", "vae.encoder.conv_in.lora_B.weight")
    with pytest.raises(lora_files.LoraFileError, match="dropped silently"):
        lora_files.layers(str(path), "1", "sd15")


@pytest.mark.parametrize("checkpoint", ["tiny-sd15", "tiny-sd15.safetensors"])
def test_a_lora_for_another_model_names_the_first_layer_that_differs(demo_dir: Path, checkpoint: str) -> None:
    ckpt = str(demo_dir / "checkpoints" / checkpoint)
    assert lora_match.mismatch(str(demo_dir / "loras" / "tiny-sd15-te.safetensors"), "1", ckpt, "1") is None
    problem = lora_match.mismatch(str(demo_dir / "loras" / "tiny-sdxl-style.safetensors"), "1", ckpt, "1")
    assert problem == (f"layer unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k is 96→64 in the LoRA "
                       f"and 32→64 in {checkpoint} (sd15)")


def test_a_layer_the_model_lacks_is_named(demo_dir: Path, tmp_path: Path) -> None:
    path = lora_fixtures.fake(tmp_path / "x.safetensors", "unet.nowhere.to_q.lora_A.weight",
                              "unet.nowhere.to_q.lora_B.weight")
    ckpt = str(demo_dir / "checkpoints" / "tiny-sd15")
    problem = lora_match.mismatch(str(path), "1", ckpt, "1")
    assert problem == "its layer unet.nowhere.to_q is not a layer of tiny-sd15 (sd15)"
