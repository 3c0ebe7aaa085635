"""ComfyUI's latent nodes: EmptyLatentImage, EmptySD3LatentImage, VAEDecode, VAEEncode.

A LATENT holds the VAE's latents unscaled (as the UNet sees them: encoded × the VAE's scaling
factor), one eighth of the image's size, like ComfyUI's. Pixels follow ComfyUI too: VAEDecode maps
the VAE's [-1, 1] to [0, 1] and quantises to 8 bits by truncation, as ComfyUI's SaveImage does;
VAEEncode takes the posterior's mode (no sampling noise), so encoding is deterministic.
"""

from __future__ import annotations

from typing import Any

from nodegraph.context import Context, NodeFailure
from nodegraph.schema import Input, Node, Output
from nodes.engine.images import ImageBatch
from nodes.engine.recipe import ModelRecipe
from nodes.engine.values import Latent

MAX_SIZE = 16384


class EmptyLatentImage(Node):
    type = "EmptyLatentImage"
    version = "1.0.0"
    category = "latent"
    description = "An empty (zero) latent for a batch of images of this size: the start of text to image."
    inputs = (Input("width", "INT", default=512, min=16, max=MAX_SIZE, step=8),
              Input("height", "INT", default=512, min=16, max=MAX_SIZE, step=8),
              Input("batch_size", "INT", default=1, min=1, max=4096))
    outputs = (Output("LATENT", "LATENT"),)

    @classmethod
    def check(cls, literals: dict[str, Any], settings: Any) -> list[tuple[str | None, str]]:
        return [(name, f"{literals[name]} is not a multiple of 8")
                for name in ("width", "height") if name in literals and literals[name] % 8]

    def run(self, ctx: Context, width: int, height: int, batch_size: int) -> dict[str, Any]:
        import torch

        return {"LATENT": Latent(torch.zeros(batch_size, 4, height // 8, width // 8))}


class VAEDecode(Node):
    type = "VAEDecode"
    version = "1.0.0"
    category = "latent"
    description = "Latents to pixels with the VAE."
    inputs = (Input("samples", "LATENT"), Input("vae", "VAE"))
    outputs = (Output("IMAGE", "IMAGE"),)

    def run(self, ctx: Context, samples: Latent, vae: ModelRecipe) -> dict[str, Any]:
        return {"IMAGE": decode(ctx, samples, vae)}


def decode(ctx: Context, samples: Latent, vae: ModelRecipe, params: dict[str, Any] | None = None) -> ImageBatch:
    """Pixels of latents: one image at a time, in tiles above a megapixel, checking cancellation between them."""
    import numpy as np
    import torch

    from nodes.engine.memory import bounded_decode
    from nodes.engine.pipelines import materialize

    with materialize(ctx, vae) as resident:
        model = resident.pipe.vae
        if samples.samples.shape[1] != model.config.latent_channels:
            raise NodeFailure(f"the latent has {samples.samples.shape[1]} channels; this VAE takes "
                              f"{model.config.latent_channels}", "samples", "wrong_latent")
        # SD3's and Flux's VAEs also shift their latents (`shift_factor`); SD's have none.
        shift = model.config.get("shift_factor") or 0.0
        latents = samples.samples.to(resident.device, model.dtype) / model.config.scaling_factor + shift
        height, width = (8 * side for side in latents.shape[-2:])
        with torch.inference_mode(), bounded_decode(ctx, model, width, height):
            images = model.decode(latents).sample.float().cpu()
    pixels = ((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return ImageBatch((pixels * 255).astype(np.uint8), params or {})


class VAEEncode(Node):
    type = "VAEEncode"
    version = "1.0.0"
    category = "latent"
    description = "Pixels to latents with the VAE (the posterior's mode), for image to image."
    inputs = (Input("pixels", "IMAGE"), Input("vae", "VAE"))
    outputs = (Output("LATENT", "LATENT"),)

    def run(self, ctx: Context, pixels: ImageBatch, vae: ModelRecipe) -> dict[str, Any]:
        return {"LATENT": Latent(encode(ctx, pixels, vae))}


def encode(ctx: Context, pixels: ImageBatch, vae: ModelRecipe) -> Any:
    """The VAE latents (scaled, as the UNet sees them) of images cropped to the latent grid (see `grid_crop`)."""
    import torch

    rows, cols = grid_crop(pixels.pixels.shape[1], pixels.pixels.shape[2])
    array = pixels.pixels[:, rows, cols]
    return encode_pixels(ctx, torch.from_numpy(array.copy()).permute(0, 3, 1, 2).float() / 255, vae)


def grid_crop(height: int, width: int) -> tuple[slice, slice]:
    """The rows and columns of an image kept for encoding: sides cut to multiples of 8 with equal margins
    (the odd pixel on the bottom/right), as ComfyUI crops before its VAE encodes."""
    if height < 8 or width < 8:
        raise NodeFailure(f"a {width}×{height} image is too small to encode (8×8 at least)", "pixels", "too_small")
    top, left = (height % 8) // 2, (width % 8) // 2
    return slice(top, top + height // 8 * 8), slice(left, left + width // 8 * 8)


def encode_pixels(ctx: Context, x: Any, vae: ModelRecipe) -> Any:
    """The scaled VAE latents of float pixels (batch, 3, height, width) in 0..1, sides multiples of 8."""
    import torch

    from nodes.engine.pipelines import materialize

    with materialize(ctx, vae) as resident:
        model = resident.pipe.vae
        out = []
        with torch.inference_mode():
            for one in (x * 2 - 1).to(resident.device, model.dtype):
                out.append(model.encode(one[None]).latent_dist.mode().float().cpu())
                ctx.check_cancelled()
        return (torch.cat(out) - (model.config.get("shift_factor") or 0.0)) * model.config.scaling_factor


class EmptySD3LatentImage(Node):
    type = "EmptySD3LatentImage"
    version = "1.0.0"
    category = "latent"
    description = "An empty (zero) latent of 16 channels, for SD3 and Flux, as ComfyUI's."
    inputs = EmptyLatentImage.inputs
    outputs = (Output("LATENT", "LATENT"),)
    check = EmptyLatentImage.check

    def run(self, ctx: Context, width: int, height: int, batch_size: int) -> dict[str, Any]:
        import torch

        return {"LATENT": Latent(torch.zeros(batch_size, 16, height // 8, width // 8))}


NODES: list[type[Node]] = [EmptyLatentImage, VAEDecode, VAEEncode, EmptySD3LatentImage]
