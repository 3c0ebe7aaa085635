"""The full-size random SD1.5-architecture checkpoints that bench/load.py loads, made quickly and offline.

Not a benchmark itself. `make(root)` writes, unless already there (a `.version` marker per output):

  sd15-fp32/                  diffusers folder, float32 tensors  (≈4.3 GB)
  sd15-fp16/                  diffusers folder, float16 tensors  (≈2.1 GB)
  sd15-fp32.safetensors       one file in the original ldm layout, float32
  sd15-fp16.safetensors       the same, float16
  clip-bpe/bpe_simple_vocab_16e6.txt.gz   a CLIP BPE file with made-up merges (49408-token vocabulary)

The architecture is SD1.5's: UNet2DConditionModel's defaults (≈860 M parameters), the SD VAE, and CLIP ViT-L/14's
text tower with the real 49408-token vocabulary size (≈123 M parameters), so every tensor has the size of the
released checkpoint's. The tokenizer's merges are made up (we have no network); `load_pipeline` finds them
through `NODEGRAPH_CLIP_BPE`, which bench/load.py sets. Weights are normal(0, 0.02) noise, written straight into
modules built on the meta device (skipping the modules' own random init, which is slower at this size).
"""

from __future__ import annotations

import gzip
import time
from pathlib import Path
from typing import Any

import torch

VERSION = "1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def bpe_path(root: Path) -> Path:
    return root / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"


def folder(root: Path, storage: str) -> Path:
    return root / f"sd15-{storage}"


def single_file(root: Path, storage: str) -> Path:
    return root / f"sd15-{storage}.safetensors"


def weight_files(path: Path) -> list[Path]:
    """The safetensors files a checkpoint's weights are in: the file itself, or every one in the folder."""
    return [path] if path.is_file() else sorted(path.rglob("*.safetensors"))


def make(root: Path, seed: int = 0) -> None:
    """Write every checkpoint above into `root`, skipping those already there in this version."""
    outputs = [p(root, s) for s in DTYPES for p in (folder, single_file)]
    marker = root / ".version"
    if marker.is_file() and marker.read_text() == VERSION and all(p.exists() for p in outputs):
        return
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"making the full-size random SD1.5 checkpoints in {root} (≈13 GB) …", flush=True)
    _write_fake_clip_bpe(bpe_path(root))
    pipe = _random_pipeline(bpe_path(root), seed)
    for storage, dtype in DTYPES.items():
        pipe.to(dtype)
        pipe.save_pretrained(folder(root, storage), safe_serialization=True)
        _write_single_file(pipe, single_file(root, storage))
        print(f"  {storage} written ({time.perf_counter() - started:.0f} s)", flush=True)
    marker.write_text(VERSION)


def make_single_file(root: Path, storage: str = "fp16", seed: int = 0) -> Path:
    """Write only the single-file checkpoint in `storage` dtype (and the BPE file), unless already there."""
    path, marker = single_file(root, storage), root / f".version-{storage}-file"
    if path.exists() and marker.is_file() and marker.read_text() == VERSION:
        return path
    root.mkdir(parents=True, exist_ok=True)
    print(f"making the full-size random SD1.5 {storage} single file in {root} …", flush=True)
    _write_fake_clip_bpe(bpe_path(root))
    pipe = _random_pipeline(bpe_path(root), seed)
    pipe.to(DTYPES[storage])
    _write_single_file(pipe, path)
    marker.write_text(VERSION)
    return path


def _write_fake_clip_bpe(path: Path) -> None:
    """OpenAI's BPE file format (a version line, then merges), with made-up merges filling CLIP's vocabulary."""
    from nodes.engine.clip_tokenizers import CLIP_VOCAB_SIZE, bytes_to_unicode

    alphabet = bytes_to_unicode()
    count = CLIP_VOCAB_SIZE - 2 * 256 - 2
    seconds = [*alphabet, *(c + "</w>" for c in alphabet)]
    pairs = (f"{a} {b}" for a in alphabet for b in seconds)  # distinct merged tokens: `a` is one character
    lines = ["#version: 0.2", *(next(pairs) for _ in range(count))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress("\n".join(lines).encode()))


def _random_pipeline(bpe: Path, seed: int) -> Any:
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from nodes.engine.clip_tokenizers import clip_tokenizer_from_bpe
    from nodes.engine.single_file_configs import scheduler_config

    tokenizer = clip_tokenizer_from_bpe(bpe, "<|endoftext|>")
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the defaults are SD1.5's blocks
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                projection_dim=768,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    generator = torch.Generator().manual_seed(seed)
    for model in (unet, vae, text_encoder):
        model.to_empty(device="cpu")
        for param in model.parameters():
            param.data.normal_(0.0, 0.02, generator=generator)
        for name, buffer in model.named_buffers():
            if name.endswith("position_ids"):  # CLIP's (non-persistent) position ids
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    config = scheduler_config("sd15")
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=getattr(diffusers, config["_class_name"]).from_config(config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _write_single_file(pipe: Any, path: Path) -> None:
    from safetensors.torch import save_file

    from nodes.engine.demo_models import to_ldm_state_dict

    save_file(to_ldm_state_dict(pipe), path, metadata={"format": "pt"})


if __name__ == "__main__":
    import sys

    make(Path(sys.argv[1]))
