"""ComfyUI's image loaders: LoadImage (IMAGE and MASK) and LoadImageMask, from the input folder.

Behaviour follows ComfyUI's: EXIF orientation is applied; the MASK is 1 − alpha (so the transparent
part of a PNG is what gets repainted), or 64×64 zeros when the image has no alpha; a multi-frame file
(animated GIF/PNG/WebP, multi-page TIFF) gives a batch, leaving out frames whose size differs from the
first. Names are confined to the input folder like model names, and files are fingerprinted, so a
replaced file runs its node again. Anything that is not a readable image, or is too large, is a node
error on `image`.

    LoadImage(image="demo.png") -> IMAGE (1, 64, 64, 3) uint8, MASK (1, 64, 64)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nodegraph.context import Context, NodeFailure
from nodegraph.schema import Input, Node, Output
from nodegraph.settings import MAX_IMAGE_PIXELS as MAX_PIXELS
from nodegraph.settings import MAX_IMAGE_SIDE as MAX_SIDE
from nodegraph.settings import Settings
from nodes.engine.images import ImageBatch
from nodes.engine.values import MaskBatch

MAX_BATCH_PIXELS = 1 << 28  # all frames of a file together (768 MiB as 8-bit RGB)
CHANNELS = ("alpha", "red", "green", "blue")


def _images(settings: Settings) -> list[str]:
    return settings.input_files()


def input_path(settings: Settings, name: str) -> Path:
    try:
        return settings.resolve_input(name)
    except FileNotFoundError as exc:
        raise NodeFailure(str(exc), "image", getattr(exc, "code", "file_not_found")) from None


def check_size(width: int, height: int, what: str) -> str | None:
    """Why an image of this size is refused, or None."""
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        return (f"{what} is {width}×{height}: too large (at most {MAX_SIDE} pixels a side and "
                f"{MAX_PIXELS // 2**20} megapixels)")
    return None


@contextmanager
def opened(path: Path, name: str) -> Iterator[Any]:
    """The file as a PIL image, with unreadable or oversized files as node errors on `image`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            problem = check_size(image.width, image.height, name)
            if problem:
                raise NodeFailure(problem, "image", "too_large")
            yield image
    except Image.DecompressionBombError:  # Pillow refuses a header claiming over ≈179 megapixels before we can
        raise NodeFailure(f"{name} is too large (over 179 megapixels; at most {MAX_SIDE} pixels a side and "
                          f"{MAX_PIXELS // 2**20} megapixels)", "image", "too_large") from None
    except UnidentifiedImageError as exc:
        raise NodeFailure(f"{name} is not an image this can read ({exc})", "image", "bad_image") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data inside a known format
        raise NodeFailure(f"{name} could not be read: {exc}", "image", "bad_image") from None


def _upright(frame: Any) -> Any:
    from PIL import ImageOps

    frame = ImageOps.exif_transpose(frame)
    if frame.mode == "I":  # 32-bit integer pixels: ComfyUI scales them down by 255
        frame = frame.point(lambda value: value * (1 / 255))
    return frame


def _alpha_mask(frame: Any) -> Any:
    """1 − alpha in 0..1, or None when the frame has no transparency."""
    import numpy as np

    if "A" in frame.getbands():
        alpha = frame.getchannel("A")
    elif frame.mode == "P" and "transparency" in frame.info:
        alpha = frame.convert("RGBA").getchannel("A")
    else:
        return None
    return 1.0 - np.asarray(alpha, dtype=np.float32) / 255.0


def read_image(path: Path, name: str) -> tuple[Any, Any]:
    """The frames as uint8 (batch, height, width, 3) and their masks (batch, mask height, mask width)."""
    import numpy as np
    from PIL import ImageSequence

    frames: list[Any] = []
    masks: list[Any] = []
    with opened(path, name) as image:
        all_frames = image.format != "MPO"  # MPO's second frame is the other eye of a 3D photo, not a batch
        total = 0
        for frame in ImageSequence.Iterator(image):
            frame = _upright(frame)
            rgb = np.asarray(frame.convert("RGB"), dtype=np.uint8)
            if frames and rgb.shape != frames[0].shape:
                continue  # as ComfyUI: frames of another size are left out
            total += rgb.shape[0] * rgb.shape[1]
            if total > MAX_BATCH_PIXELS:
                raise NodeFailure(f"{name} has too many frames: over {MAX_BATCH_PIXELS // 2**20} megapixels "
                                  "in all", "image", "too_large")
            frames.append(rgb)
            masks.append(_alpha_mask(frame))
            if not all_frames:
                break
    if not frames:
        raise NodeFailure(f"{name} has no frames", "image", "bad_image")
    height, width = frames[0].shape[:2]
    if all(mask is None for mask in masks):
        mask_shape = (64, 64)  # ComfyUI's placeholder for "no mask"
    else:
        mask_shape = (height, width)
    filled = [np.zeros(mask_shape, np.float32) if mask is None else mask for mask in masks]
    return np.stack(frames), np.stack(filled)


class LoadImage(Node):
    type = "LoadImage"
    version = "1.0.0"
    category = "image"
    description = ("An image from the input folder (upload with POST /api/upload/image): its pixels, and a MASK "
                   "of its transparent part (1 − alpha; 64×64 zeros without alpha). Several frames give a batch.")
    inputs = (Input("image", "COMBO", choices=_images),)
    outputs = (Output("IMAGE", "IMAGE"), Output("MASK", "MASK"))

    @classmethod
    def files(cls, inputs: dict[str, Any], settings: Any) -> list[Path]:
        return [input_path(settings, inputs["image"])]

    def run(self, ctx: Context, image: str) -> dict[str, Any]:
        import torch

        pixels, masks = read_image(input_path(ctx.settings, image), image)
        return {"IMAGE": ImageBatch(pixels), "MASK": MaskBatch(torch.from_numpy(masks))}


class LoadImageMask(Node):
    type = "LoadImageMask"
    version = "1.0.0"
    category = "mask"
    description = "One channel of an image from the input folder as a MASK (alpha is inverted: transparent = 1)."
    inputs = (Input("image", "COMBO", choices=_images), Input("channel", "COMBO", default="alpha", choices=CHANNELS))
    outputs = (Output("MASK", "MASK"),)

    @classmethod
    def files(cls, inputs: dict[str, Any], settings: Any) -> list[Path]:
        return [input_path(settings, inputs["image"])]

    def run(self, ctx: Context, image: str, channel: str) -> dict[str, Any]:
        import numpy as np
        import torch

        with opened(input_path(ctx.settings, image), image) as file:
            frame = _upright(file)  # the first frame only, as ComfyUI
            if frame.getbands() != ("R", "G", "B", "A"):
                frame = frame.convert("RGBA")
            values = np.asarray(frame.getchannel(channel[0].upper()), dtype=np.float32) / 255.0
        mask = 1.0 - values if channel == "alpha" else values
        return {"MASK": MaskBatch(torch.from_numpy(np.ascontiguousarray(mask))[None])}


NODES: list[type[Node]] = [LoadImage, LoadImageMask]
