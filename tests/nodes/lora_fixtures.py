"""LoRA files in other layouts and formats, written by the tests from the demo LoRAs (never downloaded)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}  # noqa: SIM118


def text_encoder_only(demo_dir: Path, out: Path) -> Path:
    """The text-encoder half of tiny-sd15-te, with its metadata."""
    tensors, metadata = read(demo_dir / "loras" / "tiny-sd15-te.safetensors")
    meta = {k: v for k, v in json.loads(metadata["lora_adapter_metadata"]).items() if k.startswith("text_encoder.")}
    save_file({k: v for k, v in tensors.items() if k.startswith("text_encoder.")}, out,
              metadata={"lora_adapter_metadata": json.dumps(meta)})
    return out


def training_script_layout(demo_dir: Path, out: Path) -> Path:
    """tiny-sd15-te as diffusers' old training scripts saved it: attention-processor keys for the UNet
    (`…attn1.processor.to_q_lora.down.weight`) and `lora_linear_layer` keys for the text encoder. Its alpha
    equals its rank, so it needs no metadata."""
    tensors, _ = read(demo_dir / "loras" / "tiny-sd15-te.safetensors")
    renamed = {}
    for key, value in tensors.items():
        half = "down" if ".lora_A." in key else "up"
        module = re.sub(r"\.lora_[AB]\.weight$", "", key)
        if module.startswith("unet."):
            module = re.sub(r"\.(to_q|to_k|to_v|to_out)(\.0)?$", r".processor.\1_lora", module)
            renamed[f"{module}.{half}.weight"] = value
        else:
            renamed[f"{module}.lora_linear_layer.{half}.weight"] = value
    save_file(renamed, out)
    return out


def with_conv_in(base_unet: torch.nn.Module, out: Path, rank: int = 2, alpha: float = 1.0) -> Path:
    """A PEFT-format LoRA on conv_in (a convolution outside every attention block) and one down-block layer."""
    generator = torch.Generator().manual_seed(3)
    conv = base_unet.conv_in
    attention = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    linear = base_unet.get_submodule(attention)
    tensors = {
        "unet.conv_in.lora_A.weight": torch.randn(rank, conv.in_channels, 3, 3, generator=generator),
        "unet.conv_in.lora_B.weight": torch.randn(conv.out_channels, rank, 1, 1, generator=generator) * 0.3,
        f"unet.{attention}.lora_A.weight": torch.randn(rank, linear.in_features, generator=generator) * 0.3,
        f"unet.{attention}.lora_B.weight": torch.randn(linear.out_features, rank, generator=generator) * 0.3,
    }
    meta = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": ["conv_in", attention]}
    save_file(tensors, out, metadata={"lora_adapter_metadata": json.dumps(meta)})
    return out


def fake(out: Path, *keys: str) -> Path:
    """A file with the given keys (small tensors): enough for anything that reads the header."""
    save_file({key: torch.zeros(4, 4) for key in keys}, out)
    return out
