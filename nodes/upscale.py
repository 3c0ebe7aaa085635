"""ComfyUI's resizing nodes: ImageScale, ImageScaleBy, LatentUpscale, LatentUpscaleBy.

One resize for all four, as ComfyUI's: `crop="center"` first cuts the input to the target's aspect
ratio (equal margins), then torch's interpolation resizes (`nearest-exact`, `bilinear`, `area`,
`bicubic`; no antialiasing, as ComfyUI), or PIL's Lanczos for images, or `bislerp` for latents:
bilinear interpolation that slerps between neighbouring latent vectors (their directions along the
great circle, their lengths linearly), so upscaled latents keep their norms. A width or height of 0
keeps the aspect ratio (both 0: unchanged). Images stay 8-bit: they are resized in float and rounded.

    LatentUpscaleBy(samples (1, 4, 8, 8), "bislerp", 1.5) -> (1, 4, 12, 12)
"""

from __future__ import annotations

from typing import Any

from nodegraph.context import Context
from nodegraph.schema import Input, Node, Output
from nodes.engine.images import ImageBatch
from nodes.engine.values import Latent

MAX_SIZE = 16384
IMAGE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
LATENT_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
CROPS = ("disabled", "center")
SCALE_BY = {"min": 0.01, "max": 8.0, "step": 0.01}


def center_crop(x: Any, width: int, height: int) -> Any:
    """`x` (…, H, W) cut to the aspect ratio width:height, equal margins on both sides."""
    old_height, old_width = x.shape[-2:]
    old_aspect, new_aspect = old_width / old_height, width / height
    left = top = 0
    if old_aspect > new_aspect:
        left = round((old_width - old_width * new_aspect / old_aspect) / 2)
    elif old_aspect < new_aspect:
        top = round((old_height - old_height * old_aspect / new_aspect) / 2)
    return x[..., top:old_height - top, left:old_width - left]


def _slerp(a: Any, b: Any, t: Any) -> Any:
    """Spherical interpolation between vectors along dim 1 (directions slerped, lengths lerped)."""
    import torch

    norm_a, norm_b = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    unit_a, unit_b = a / norm_a.clamp_min(1e-12), b / norm_b.clamp_min(1e-12)
    dot = (unit_a * unit_b).sum(1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(dot)
    sin = torch.sin(omega)
    # Nearly parallel (or opposite) directions: slerp degenerates, so interpolate linearly there.
    linear = sin.abs() < 1e-4
    safe = torch.where(linear, torch.ones_like(sin), sin)
    weight_a = torch.where(linear, 1 - t, torch.sin((1 - t) * omega) / safe)
    weight_b = torch.where(linear, t, torch.sin(t * omega) / safe)
    direction = weight_a * unit_a + weight_b * unit_b
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return direction * (norm_a * (1 - t) + norm_b * t)


def _bislerp_axis(x: Any, size: int, dim: int) -> Any:
    """Resize `x` (B, C, H, W) along `dim` (2 or 3) with bilinear sample positions and slerp."""
    import torch

    old = x.shape[dim]
    position = ((torch.arange(size, dtype=torch.float64) + 0.5) * old / size - 0.5).clamp(0, old - 1)
    low = position.floor().long()
    high = (low + 1).clamp(max=old - 1)
    shape = [1, 1, 1, 1]
    shape[dim] = size
    t = (position - low).to(x.dtype).reshape(shape)
    return _slerp(x.index_select(dim, low), x.index_select(dim, high), t)


def bislerp(x: Any, width: int, height: int) -> Any:
    return _bislerp_axis(_bislerp_axis(x, width, 3), height, 2)


def resize(x: Any, width: int, height: int, method: str, crop: str) -> Any:
    """`x` (B, C, H, W) float resized to width×height (ComfyUI's common upscale)."""
    import torch

    if crop == "center":
        x = center_crop(x, width, height)
    if method == "bislerp":
        return bislerp(x, width, height)
    return torch.nn.functional.interpolate(x, size=(height, width), mode=method)


def resize_images(images: ImageBatch, width: int, height: int, method: str, crop: str) -> ImageBatch:
    import numpy as np
    import torch

    pixels = images.pixels
    if method == "lanczos":  # PIL's, on the 8-bit pixels, as ComfyUI does
        from PIL import Image

        if crop == "center":
            pixels = center_crop(pixels.transpose(0, 3, 1, 2), width, height).transpose(0, 2, 3, 1)
        out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(one)).resize(
            (width, height), Image.Resampling.LANCZOS)) for one in pixels])
        return ImageBatch(out, dict(images.params))
    x = torch.from_numpy(pixels.copy()).permute(0, 3, 1, 2).float() / 255
    x = resize(x, width, height, method, crop)
    out = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return ImageBatch(out, dict(images.params))


def _keep_aspect(old_width: int, old_height: int, width: int, height: int, least: int = 1) -> tuple[int, int]:
    """Fill in a 0 width or height from the other and the old aspect ratio (ComfyUI's rule)."""
    if width == 0:
        width = max(least, round(old_width * height / old_height))
    elif height == 0:
        height = max(least, round(old_height * width / old_width))
    return width, height


class ImageScale(Node):
    type = "ImageScale"
    version = "1.0.0"
    category = "image/upscaling"
    description = ("Resizes images to width×height; crop 'center' cuts to that aspect ratio first. A width or "
                   "height of 0 keeps the aspect ratio; both 0 leave the images as they are.")
    inputs = (Input("image", "IMAGE"),
              Input("upscale_method", "COMBO", default=IMAGE_METHODS[0], choices=IMAGE_METHODS),
              Input("width", "INT", default=512, min=0, max=MAX_SIZE, step=1),
              Input("height", "INT", default=512, min=0, max=MAX_SIZE, step=1),
              Input("crop", "COMBO", default="disabled", choices=CROPS))
    outputs = (Output("IMAGE", "IMAGE"),)

    def run(self, ctx: Context, image: ImageBatch, upscale_method: str, width: int, height: int,
            crop: str) -> dict[str, Any]:
        if width == 0 and height == 0:
            return {"IMAGE": image}
        _, old_height, old_width, _ = image.pixels.shape
        width, height = _keep_aspect(old_width, old_height, width, height)
        return {"IMAGE": resize_images(image, width, height, upscale_method, crop)}


class ImageScaleBy(Node):
    type = "ImageScaleBy"
    version = "1.0.0"
    category = "image/upscaling"
    description = "Resizes images by a factor (each side rounded to whole pixels)."
    inputs = (Input("image", "IMAGE"),
              Input("upscale_method", "COMBO", default=IMAGE_METHODS[0], choices=IMAGE_METHODS),
              Input("scale_by", "FLOAT", default=1.0, **SCALE_BY))
    outputs = (Output("IMAGE", "IMAGE"),)

    def run(self, ctx: Context, image: ImageBatch, upscale_method: str, scale_by: float) -> dict[str, Any]:
        _, height, width, _ = image.pixels.shape
        size = max(1, round(width * scale_by)), max(1, round(height * scale_by))
        return {"IMAGE": resize_images(image, *size, upscale_method, "disabled")}


class LatentUpscale(Node):
    type = "LatentUpscale"
    version = "1.0.0"
    category = "latent"
    description = ("Resizes latents to width×height pixels (1/8 in the latent; at least 64 pixels a side). A width "
                   "or height of 0 keeps the aspect ratio. A noise mask is kept as it is.")
    inputs = (Input("samples", "LATENT"),
              Input("upscale_method", "COMBO", default=LATENT_METHODS[0], choices=LATENT_METHODS),
              Input("width", "INT", default=512, min=0, max=MAX_SIZE, step=8),
              Input("height", "INT", default=512, min=0, max=MAX_SIZE, step=8),
              Input("crop", "COMBO", default="disabled", choices=CROPS))
    outputs = (Output("LATENT", "LATENT"),)

    def run(self, ctx: Context, samples: Latent, upscale_method: str, width: int, height: int,
            crop: str) -> dict[str, Any]:
        if width == 0 and height == 0:
            return {"LATENT": samples}
        old_height, old_width = samples.samples.shape[-2:]
        width, height = max(64, width) if width else 0, max(64, height) if height else 0
        width, height = _keep_aspect(old_width, old_height, width, height, least=64)
        out = resize(samples.samples, width // 8, height // 8, upscale_method, crop)
        return {"LATENT": Latent(out, samples.noise_mask)}


class LatentUpscaleBy(Node):
    type = "LatentUpscaleBy"
    version = "1.0.0"
    category = "latent"
    description = "Resizes latents by a factor (each side rounded to whole latent pixels), e.g. before a hires fix."
    inputs = (Input("samples", "LATENT"),
              Input("upscale_method", "COMBO", default=LATENT_METHODS[0], choices=LATENT_METHODS),
              Input("scale_by", "FLOAT", default=1.5, **SCALE_BY))
    outputs = (Output("LATENT", "LATENT"),)

    def run(self, ctx: Context, samples: Latent, upscale_method: str, scale_by: float) -> dict[str, Any]:
        height, width = samples.samples.shape[-2:]
        size = max(1, round(width * scale_by)), max(1, round(height * scale_by))
        return {"LATENT": Latent(resize(samples.samples, *size, upscale_method, "disabled"), samples.noise_mask)}


NODES: list[type[Node]] = [ImageScale, ImageScaleBy, LatentUpscale, LatentUpscaleBy]
