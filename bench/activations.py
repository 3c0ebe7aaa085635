"""Calibrates the activation-memory factors of `nodes/engine/memory.py`: peak memory of a UNet step and a VAE decode.

    python bench/activations.py              # tiny demo + full-size SD1.5 (random weights), ≈3 min on 2 cores
    python bench/activations.py --tiny-only  # the demo models only, seconds

Each case runs in a fresh child process: build the module (random weights, float32, CPU), reset the peak RSS
(`/proc/self/clear_refs` 5), run one forward under `torch.inference_mode()`, and report VmHWM − VmRSS before the
forward: the bytes the forward needed beyond the weights. Printed per case: bytes per latent pixel per image
(UNet, batch 2 as classifier-free guidance runs it) or per output pixel (VAE decoder, batch 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).parents[1]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(kind: str, model: str, latent: int) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.set_num_threads(1)
    with torch.device("meta"):
        if kind == "unet" and model == "sd15":
            module: torch.nn.Module = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
            context = 768
        elif kind == "unet":
            module = UNet2DConditionModel(sample_size=32, block_out_channels=(32, 64), layers_per_block=2,
                                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                          cross_attention_dim=32, attention_head_dim=8)
            context = 32
        elif model == "sd15":
            module = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                                   up_block_types=("UpDecoderBlock2D",) * 4,
                                   block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
        else:
            module = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                   latent_channels=4)
    module.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    for param in module.parameters():
        param.data.normal_(0.0, 0.02, generator=generator)
    module.eval()
    with torch.inference_mode():
        if kind == "unet":
            inputs = (torch.randn(2, 4, latent, latent), torch.tensor(500), torch.randn(2, 77, context))
        else:
            inputs = (torch.randn(1, 4, latent, latent),)
        Path("/proc/self/clear_refs").write_text("5")
        before = _status("VmRSS")
        if kind == "unet":
            module(*inputs)
        else:
            module.decode(*inputs)
        peak = _status("VmHWM") - before
    scale = 2 ** (len(module.config.block_out_channels) - 1) if kind == "vae" else 1
    pixels = (latent * scale) ** 2 * (1 if kind == "vae" else 2)
    print(json.dumps({"kind": kind, "model": model, "latent": latent, "peak": peak, "per_pixel": peak / pixels}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny-only", action="store_true")
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        child(args.case[0], args.case[1], int(args.case[2]))
        return
    cases = [("unet", "tiny", n) for n in (32, 64, 128)] + [("vae", "tiny", n) for n in (32, 64, 128)]
    if not args.tiny_only:
        cases += [("unet", "sd15", n) for n in (32, 64)] + [("vae", "sd15", n) for n in (32, 64)]
    print(f"{'module':12} {'latent':>6} {'peak MiB':>9} {'bytes/pixel':>12}")
    for kind, model, latent in cases:
        out = subprocess.run([sys.executable, __file__, "--case", kind, model, str(latent)], check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"{kind + ' ' + model:12} {latent:>6} {row['peak'] / 2**20:>9.1f} {row['per_pixel']:>12.0f}",
              flush=True)


if __name__ == "__main__":
    main()
