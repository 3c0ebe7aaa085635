"""The bundled demo IP-Adapter for tiny-sd15 and the tiny CLIP vision encoder it takes embeddings from.

    clip_vision/tiny-clip-vision.safetensors      CLIPVisionModelWithProjection (random, 32×32 images, 32-wide
                                                  embeddings), its config as JSON in the metadata
    ipadapter/tiny-sd15-ipadapter.safetensors     diffusers' single-file IP-Adapter layout: image_proj.proj/norm
                                                  (4 tokens) and ip_adapter.N.to_k_ip / to_v_ip per cross-attention

`write_adapter` makes one for any SD1.x/SDXL UNet, also Plus and Full ones (the tests write tiny-sdxl's and the
Plus/Full ones: bundled, they would take the demo set over its size limit).

Random weights, scaled so that the image visibly changes the result; a few hundred KiB together.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CLIP_VISION_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "image_size": 32, "patch_size": 8, "projection_dim": 32, "num_channels": 3}
TOKENS = 4  # what diffusers' loader assumes for an image_proj.proj layout
FAMILIES = ("sd15",)  # the bundled adapters


def demo_ipadapter_paths(root: Path) -> list[Path]:
    return [Path(root) / "clip_vision" / "tiny-clip-vision.safetensors",
            *(Path(root) / "ipadapter" / f"tiny-{family}-ipadapter.safetensors" for family in FAMILIES)]


def _generator(seed: int, name: str) -> Any:
    import torch

    derived = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1
    return torch.Generator().manual_seed(derived)


def write_demo_ipadapter(folder: Path, seed: int, unets: dict[str, Any]) -> None:
    """Write the CLIP vision encoder and an IP-Adapter for each family's UNet (`unets`) under `folder`."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    vision_path = demo_ipadapter_paths(folder)[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(_generator(seed, "clip_vision").initial_seed()))
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION_CONFIG))
    vision_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in vision.state_dict().items()}
    save_file(state, vision_path, metadata={"clip_vision_config": json.dumps(CLIP_VISION_CONFIG, sort_keys=True)})
    for family in FAMILIES:
        write_adapter(folder / "ipadapter" / f"tiny-{family}-ipadapter.safetensors", seed, family, unets[family])


def write_adapter(path: Path, seed: int, family: str, unet: Any, projection: str = "ip") -> None:
    """A random IP-Adapter for `unet` in diffusers' layout: `projection` "ip" for the demo encoder's 32-wide image
    embeddings, "plus" (a Resampler) or "full" (an MLP per token) for its 32-wide hidden states."""
    import torch
    from safetensors.torch import save_file

    generator = _generator(seed, f"ipadapter/{family}" + ("" if projection == "ip" else f"/{projection}"))
    cross, width = unet.config.cross_attention_dim, CLIP_VISION_CONFIG["projection_dim"]
    hidden = CLIP_VISION_CONFIG["hidden_size"]
    if projection == "plus":
        tensors = _resampler(generator, hidden, cross)
    elif projection == "full":
        tensors = {"image_proj.proj.0.weight": torch.randn(hidden, hidden, generator=generator) / hidden ** 0.5,
                   "image_proj.proj.0.bias": torch.zeros(hidden),
                   "image_proj.proj.2.weight": torch.randn(cross, hidden, generator=generator) / hidden ** 0.5,
                   "image_proj.proj.2.bias": torch.zeros(cross),
                   "image_proj.proj.3.weight": torch.ones(cross), "image_proj.proj.3.bias": torch.zeros(cross)}
    else:
        tensors = {
            "image_proj.proj.weight": torch.randn(cross * TOKENS, width, generator=generator) / width ** 0.5,
            "image_proj.proj.bias": torch.zeros(cross * TOKENS),
            "image_proj.norm.weight": torch.ones(cross),
            "image_proj.norm.bias": torch.zeros(cross),
        }
    number = 1  # diffusers numbers the attention processors' IP layers 1, 3, 5, … (self-attention takes the evens)
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            hidden = module.to_k.out_features
            for kind in ("to_k_ip", "to_v_ip"):
                tensors[f"ip_adapter.{number}.{kind}.weight"] = (
                    torch.randn(hidden, cross, generator=generator) * 2 / cross ** 0.5)
            number += 2
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def _resampler(generator: Any, embed: int, cross: int, hidden: int = 64, depth: int = 4) -> dict[str, Any]:
    """IP-Adapter Plus's image projection (a Resampler, the original release's key names): TOKENS learned queries
    attending to the encoder's hidden states through `depth` blocks of one 64-wide head and a 4× feed-forward."""
    import torch

    def linear(rows: int, cols: int) -> Any:
        return torch.randn(rows, cols, generator=generator) / cols ** 0.5

    tensors = {"image_proj.latents": torch.randn(1, TOKENS, hidden, generator=generator) / hidden ** 0.5,
               "image_proj.proj_in.weight": linear(hidden, embed), "image_proj.proj_in.bias": torch.zeros(hidden),
               "image_proj.proj_out.weight": linear(cross, hidden), "image_proj.proj_out.bias": torch.zeros(cross),
               "image_proj.norm_out.weight": torch.ones(cross), "image_proj.norm_out.bias": torch.zeros(cross)}
    for i in range(depth):
        block = f"image_proj.layers.{i}"
        for norm in (f"{block}.0.norm1", f"{block}.0.norm2", f"{block}.1.0"):
            tensors[f"{norm}.weight"], tensors[f"{norm}.bias"] = torch.ones(hidden), torch.zeros(hidden)
        tensors.update({f"{block}.0.to_q.weight": linear(64, hidden),
                        f"{block}.0.to_kv.weight": linear(128, hidden),
                        f"{block}.0.to_out.weight": linear(hidden, 64),
                        f"{block}.1.1.weight": linear(4 * hidden, hidden),
                        f"{block}.1.3.weight": linear(hidden, 4 * hidden)})
    return tensors
