"""The bundled demo input image, `demo.png` in the input folder, for img2img and inpainting examples.

64×64 RGBA, drawn (no randomness, so the file is the same everywhere): a sky-to-ground gradient with
a sun and a hill, and a transparent rectangle (x 24–47, y 16–39, on the 8-pixel latent grid) over
part of the sun. LoadImage turns the transparency into its MASK (1 there), so `workflows/inpaint.json`
repaints exactly that rectangle. `nodegraph models demo` writes it beside the models:

    nodegraph models demo --input-dir input     # input/demo.png
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np

NAME = "demo.png"
SIZE = 64
HOLE = (24, 16, 48, 40)  # left, top, right, bottom: the transparent (to be repainted) rectangle


def demo_image() -> np.ndarray:
    """The demo image as uint8 (64, 64, 4) RGBA."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)
    sky = np.stack([60 + 120 * y, 120 + 80 * y, 230 - 60 * y], axis=-1)
    ground = np.stack([70 + 40 * x, 140 - 30 * y, 50 + 20 * x], axis=-1)
    hill = y > 0.62 + 0.12 * np.cos(x * np.pi * 2)
    rgb = np.where(hill[..., None], ground, sky)
    sun = (x - 0.72) ** 2 + (y - 0.26) ** 2 < 0.03
    rgb[sun] = (250, 210, 80)
    alpha = np.full((SIZE, SIZE), 255, np.float32)
    left, top, right, bottom = HOLE
    alpha[top:bottom, left:right] = 0
    return np.dstack([rgb, alpha]).round().clip(0, 255).astype(np.uint8)


def make_demo_input(input_dir: Path) -> Path:
    """Write `demo.png` into the input folder (atomically; left alone when already the same); its path."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(demo_image(), "RGBA").save(buffer, format="PNG")
    data = buffer.getvalue()
    path = Path(input_dir) / NAME
    if path.is_file() and path.read_bytes() == data:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".demo-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path
