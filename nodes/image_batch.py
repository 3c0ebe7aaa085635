"""ImageBatch, as ComfyUI's: two IMAGE batches as one (the second resized to the first's size when they differ).

    ImageBatch(image1 (1, 64, 64, 3), image2 (2, 32, 48, 3)) -> (3, 64, 64, 3)

Used to show an IP-Adapter several reference images at once (IPAdapterApply takes a batch).
"""

from __future__ import annotations

from typing import Any

from nodegraph.context import Context
from nodegraph.schema import Input, Node, Output
from nodes.engine.images import ImageBatch as Images
from nodes.upscale import resize_images


class ImageBatch(Node):
    type = "ImageBatch"
    version = "1.0.0"
    category = "image"
    description = ("image1's images followed by image2's, in one batch; image2 is first resized to image1's size "
                   "(cut to its aspect ratio, bilinear) when they differ.")
    inputs = (Input("image1", "IMAGE"), Input("image2", "IMAGE"))
    outputs = (Output("IMAGE", "IMAGE"),)

    def run(self, ctx: Context, image1: Images, image2: Images) -> dict[str, Any]:
        import numpy as np

        _, height, width, _ = image1.pixels.shape
        if image2.pixels.shape[1:3] != (height, width):
            image2 = resize_images(image2, width, height, "bilinear", "center")
        return {"IMAGE": Images(np.concatenate([image1.pixels, image2.pixels]), dict(image1.params))}


NODES: list[type[Node]] = [ImageBatch]
