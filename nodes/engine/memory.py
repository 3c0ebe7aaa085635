"""What sampling needs around the model: an activation-memory estimate and bounded decoding.

(The seeded CPU noise is `nodes.engine.sigmas.initial_noise`.)

Memory. Before anything runs, `activation_bytes` estimates what one sampling call needs beyond
the weights, from a per-family factor measured with `bench/activations.py` (float32, CPU, one
UNet step at batch 2 and one VAE decode; linear in pixels because attention uses PyTorch's
memory-efficient kernels):

    need = max(unet[family] × pixels × batch × (2 with CFG else 1),  vae × min(pixels, TILE_ABOVE_PIXELS))
           × element size / 4  +  IMAGE_BYTES × pixels × batch

where pixels = width × height, compared with the memory of the compute device (the GPU's, or the
machine's RAM) less the model's weights. The VAE decodes one image at a time (slicing) and in tiles
above `TILE_ABOVE_PIXELS`, checking for cancellation before each slice or tile.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from nodegraph.context import Context
from nodegraph.models import device_kind, format_bytes

# Bytes per output pixel per image (per CFG branch) at float32, measured with bench/activations.py on the
# full-size SD1.5 UNet with random weights: 933 at 512×512 (466 MiB at batch 2), 1624 at 256×256 (203 MiB,
# mostly fixed overhead); 702 per added pixel. SD2 shares SD1.5's UNet layout. SDXL has no attention at
# the full latent resolution, so SD1.5's factor bounds it (not measured: 10 GB of float32 weights).
UNET_BYTES_PER_PIXEL = {"sd15": 950, "sd2": 950, "sdxl": 950}
# The SD VAE decoder (128-512 channels), one image: 4252 per pixel at 512×512 (1063 MiB), 5999 at 256×256.
VAE_BYTES_PER_PIXEL = 4300
IMAGE_BYTES = 40  # the decoded RGB images themselves: float copies in the decoder, the pipeline, numpy, uint8
TILE_ABOVE_PIXELS = 1024 * 1024  # per image: a larger one is decoded in tiles


def activation_bytes(family: str | None, width: int, height: int, batch: int, cfg: bool,
                     element_size: int) -> int:
    """Bytes one Sample call needs beyond the weights (see the module docstring); family None: the smallest."""
    factor = UNET_BYTES_PER_PIXEL[family] if family in UNET_BYTES_PER_PIXEL else min(UNET_BYTES_PER_PIXEL.values())
    pixels = width * height
    unet = factor * pixels * batch * (2 if cfg else 1)
    vae = VAE_BYTES_PER_PIXEL * min(pixels, TILE_ABOVE_PIXELS)
    return max(unet, vae) * element_size // 4 + IMAGE_BYTES * pixels * batch


def too_large(need: int, room: int, width: int, height: int, batch: int, models: Any,
              weights: int = 0) -> tuple[str, str] | None:
    """(input at fault, message) when `need` bytes of activations do not fit in `room`, else None."""
    if need <= room:
        return None
    where = "the GPU" if device_kind(models.device) == "gpu" else "the RAM"
    memory = f"{where} ({format_bytes(models.device_total())})"
    has = f"what is left of {memory} after {format_bytes(weights)} of model weights" if weights else memory
    side = int(math.sqrt(width * height * max(room, 0) / need)) // 8 * 8
    blame = "batch_size" if batch > 1 and need / batch <= room else "width" if width >= height else "height"
    fits = f"about {side}×{side} fits at this batch size" if side >= 8 else "nothing fits at this batch size"
    return blame, (f"{batch}× {width}×{height} needs about {format_bytes(need)} of memory for sampling on "
                   f"{models.device}, more than {has}: {fits}; use a smaller size or batch")


def room_for_activations(models: Any, weights: int) -> int:
    """The compute device's memory less the model's weights when they sit on it (not when offloaded).

    The memory the device has, not the --vram-budget/--ram-budget: those bound the models kept resident
    (which the out-of-memory retry releases); this refuses what could never fit.
    """
    kind = device_kind(models.device)
    total: int = models.device_total()
    return total - (weights if weights <= models.limit(kind) else 0)


@contextmanager
def bounded_decode(ctx: Context, vae: Any, width: int, height: int) -> Iterator[None]:
    """While inside, the VAE decodes one image at a time, in tiles above the threshold, checking cancellation.

    diffusers' slicing and tiling call `vae.decoder` once per image or tile; a pre-hook there is the one
    place to check between them.
    """
    if width * height > TILE_ABOVE_PIXELS:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    vae.enable_slicing()
    hook = vae.decoder.register_forward_pre_hook(lambda module, args: ctx.check_cancelled())
    try:
        yield
    finally:
        hook.remove()
