"""ComfyUI's inpainting nodes: SetLatentNoiseMask and VAEEncodeForInpaint.

Both give a LATENT with a `noise_mask` (1 = repaint), which KSampler honours: outside the mask the
sampled latent ends equal to the input latent. VAEEncodeForInpaint does what ComfyUI's does for
models not trained for inpainting: the pixels under the (rounded) mask become 0.5 grey before
encoding, so nothing of what is to be replaced leaks in, and the noise mask is the mask grown by
`grow_mask_by` pixels (a max-pool of that size, the same window as ComfyUI's) so the seam is repainted
too. Images whose sides are not multiples of 8 are cropped to the latent grid with equal margins.
"""

from __future__ import annotations

import math
from typing import Any

from nodegraph.context import Context, NodeFailure
from nodegraph.schema import Input, Node, Output
from nodes.engine.images import ImageBatch
from nodes.engine.recipe import ModelRecipe
from nodes.engine.values import Latent, MaskBatch


def _batched(mask: Any, batch: int, input_name: str) -> Any:
    """`mask` (b, 1, h, w) where b is 1 or `batch`; anything else is a node error on `input_name`."""
    if mask.shape[0] not in (1, batch):
        raise NodeFailure(f"{mask.shape[0]} masks for {batch} images: give one mask, or one per image",
                          input_name, "wrong_batch")
    return mask


def grow_mask(mask: Any, grow_by: int) -> Any:
    """The mask (b, 1, h, w), rounded to 0/1 and grown: each pixel the maximum over a grow_by × grow_by window.

    The window reaches ceil((grow_by − 1) / 2) pixels up and left of each pixel and the rest down and
    right, as ComfyUI's (a convolution with that padding, cut back to the mask's size).
    """
    import torch

    rounded = mask.round()
    if grow_by == 0:
        return rounded
    padding = math.ceil((grow_by - 1) / 2)
    grown = torch.nn.functional.max_pool2d(rounded, grow_by, stride=1, padding=padding)
    return grown[..., : mask.shape[-2], : mask.shape[-1]]


class SetLatentNoiseMask(Node):
    type = "SetLatentNoiseMask"
    version = "1.0.0"
    category = "latent/inpaint"
    description = ("Attaches a mask to a latent: the sampler repaints only where the mask is 1 and keeps the "
                   "latent elsewhere (for img2img-style inpainting with a denoise below 1).")
    inputs = (Input("samples", "LATENT"), Input("mask", "MASK"))
    outputs = (Output("LATENT", "LATENT"),)

    def run(self, ctx: Context, samples: Latent, mask: MaskBatch) -> dict[str, Any]:
        noise_mask = _batched(mask.mask[:, None], samples.samples.shape[0], "mask")
        return {"LATENT": Latent(samples.samples, noise_mask)}


class VAEEncodeForInpaint(Node):
    type = "VAEEncodeForInpaint"
    version = "1.0.0"
    category = "latent/inpaint"
    description = ("Encodes pixels for inpainting: grey (0.5) under the mask, and the mask, grown by grow_mask_by "
                   "pixels, as the latent's noise mask. Use denoise 1.0.")
    inputs = (Input("pixels", "IMAGE"), Input("vae", "VAE"), Input("mask", "MASK"),
              Input("grow_mask_by", "INT", default=6, min=0, max=64, step=1))
    outputs = (Output("LATENT", "LATENT"),)

    def run(self, ctx: Context, pixels: ImageBatch, vae: ModelRecipe, mask: MaskBatch,
            grow_mask_by: int) -> dict[str, Any]:
        import torch

        from nodes.latent import encode_pixels, grid_crop

        batch, height, width, _ = pixels.pixels.shape
        rows, cols = grid_crop(height, width)
        masks = _batched(mask.mask[:, None], batch, "mask")
        masks = torch.nn.functional.interpolate(masks, size=(height, width), mode="bilinear")
        x = torch.from_numpy(pixels.pixels.copy()).permute(0, 3, 1, 2).float() / 255
        x, masks = x[..., rows, cols], masks[..., rows, cols]
        keep = 1.0 - masks.round()
        x = (x - 0.5) * keep + 0.5
        latent = encode_pixels(ctx, x, vae)
        return {"LATENT": Latent(latent, grow_mask(masks, grow_mask_by))}


NODES: list[type[Node]] = [SetLatentNoiseMask, VAEEncodeForInpaint]
