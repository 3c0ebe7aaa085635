"""ImageScale, ImageScaleBy, LatentUpscale, LatentUpscaleBy: sizes, aspect ratio, crop, methods, bislerp."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.context import Context
from nodegraph.settings import Settings
from nodes.engine.images import ImageBatch
from nodes.engine.values import Latent
from nodes.upscale import ImageScale, ImageScaleBy, LatentUpscale, LatentUpscaleBy, bislerp

RNG = np.random.default_rng(0)


def ctx() -> Context:
    return Context("job", "1", Settings())


def pixels(height: int, width: int, batch: int = 1) -> np.ndarray:
    return RNG.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)



def scale(image: ImageBatch, method: str, width: int, height: int, crop: str = "disabled") -> np.ndarray:
    out: np.ndarray = ImageScale().run(ctx(), image, method, width, height, crop)["IMAGE"].pixels
    return out


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"])
def test_image_scale_gives_the_size_asked_for(method: str) -> None:
    image = ImageBatch(pixels(20, 40, batch=2))
    for width, height in ((30, 10), (80, 40), (7, 50)):
        out = scale(image, method, width, height)
        assert out.shape == (2, height, width, 3) and out.dtype == np.uint8
    flat = ImageBatch(np.full((1, 20, 40, 3), 77, np.uint8))
    assert (scale(flat, method, 33, 17) == 77).all()  # resizing keeps a flat colour


def test_image_scale_nearest_doubles_each_pixel_and_lanczos_is_pils() -> None:
    image = ImageBatch(pixels(5, 6))
    doubled = image.pixels.repeat(2, axis=1).repeat(2, axis=2)
    assert np.array_equal(scale(image, "nearest-exact", 12, 10), doubled)
    expected = np.asarray(Image.fromarray(image.pixels[0]).resize((9, 4), Image.Resampling.LANCZOS))
    assert np.array_equal(scale(image, "lanczos", 9, 4)[0], expected)


def test_a_zero_side_keeps_the_aspect_ratio() -> None:
    image = ImageBatch(pixels(20, 40))
    assert scale(image, "bilinear", 0, 10).shape == (1, 10, 20, 3)
    assert scale(image, "bilinear", 10, 0).shape == (1, 5, 10, 3)
    assert scale(image, "bilinear", 0, 15).shape == (1, 15, 30, 3)
    assert ImageScale().run(ctx(), image, "bilinear", 0, 0, "center")["IMAGE"] is image


def test_center_crop_cuts_equal_margins_to_the_new_aspect() -> None:
    stripes = np.zeros((1, 20, 40, 3), np.uint8)
    stripes[:, :, :10] = (255, 0, 0)
    stripes[:, :, 10:30] = (0, 255, 0)
    stripes[:, :, 30:] = (0, 0, 255)
    image = ImageBatch(stripes)
    assert (scale(image, "nearest-exact", 20, 20, "center") == (0, 255, 0)).all()
    uncropped = scale(image, "nearest-exact", 20, 20)
    assert (uncropped[:, :, 0] == (255, 0, 0)).all() and (uncropped[:, :, -1] == (0, 0, 255)).all()
    tall = ImageBatch(stripes.transpose(0, 2, 1, 3).copy())  # 20 wide, 40 high: cut top and bottom
    assert (scale(tall, "nearest-exact", 10, 10, "center") == (0, 255, 0)).all()


def test_image_scale_by_rounds_each_side() -> None:
    image = ImageBatch(pixels(20, 40))
    for factor, size in ((1.5, (30, 60)), (0.33, (7, 13)), (0.01, (1, 1)), (1.0, (20, 40))):
        out = ImageScaleBy().run(ctx(), image, "bicubic", factor)["IMAGE"].pixels
        assert out.shape[1:3] == size, factor
    same = ImageScaleBy().run(ctx(), image, "nearest-exact", 1.0)["IMAGE"].pixels
    assert np.array_equal(same, image.pixels)


def upscale(samples: Latent, method: str, width: int, height: int, crop: str = "disabled") -> Latent:
    out: Latent = LatentUpscale().run(ctx(), samples, method, width, height, crop)["LATENT"]
    return out


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"])
def test_latent_upscale_sizes_are_in_pixels(method: str) -> None:
    mask = torch.ones(1, 1, 64, 96)
    latent = Latent(torch.randn(2, 4, 8, 12), mask)
    out = upscale(latent, method, 192, 128)
    assert out.samples.shape == (2, 4, 16, 24) and out.noise_mask is not None and torch.equal(out.noise_mask, mask)
    assert upscale(latent, method, 0, 128).samples.shape == (2, 4, 16, 24)  # 0: the aspect ratio decides
    assert upscale(latent, method, 200, 0).samples.shape == (2, 4, 16, 25)  # 133 pixels high, floored to 128
    assert upscale(latent, method, 48, 0).samples.shape == (2, 4, 8, 8)  # at least 64 pixels a side
    assert upscale(latent, method, 16, 16).samples.shape == (2, 4, 8, 8)
    for factor, size in ((1.5, (12, 18)), (1.25, (10, 15)), (0.01, (1, 1))):
        by = LatentUpscaleBy().run(ctx(), latent, method, factor)["LATENT"]
        assert by.samples.shape[-2:] == size and by.noise_mask is not None and torch.equal(by.noise_mask, mask)


def test_latent_upscale_center_crop_and_both_zero() -> None:
    latent = Latent(torch.randn(1, 4, 8, 12))
    square = upscale(latent, "nearest-exact", 64, 64, "center")
    assert torch.equal(square.samples, latent.samples[..., 2:10])
    assert upscale(latent, "bilinear", 0, 0) is latent


def test_bislerp_keeps_norms_where_bilinear_shrinks_them() -> None:
    # Parallel vectors: slerp is the lerp of lengths along one direction, so bislerp equals bilinear.
    lengths = torch.rand(1, 1, 3, 5) + 0.5
    parallel = lengths * torch.tensor([0.6, 0.8, 0.0, 0.0]).reshape(1, 4, 1, 1)
    bilinear = torch.nn.functional.interpolate(parallel, size=(7, 11), mode="bilinear")
    torch.testing.assert_close(bislerp(parallel, 11, 7), bilinear)
    # Orthogonal unit vectors: every in-between vector stays a unit vector; bilinear's shrink to 1/√2.
    orthogonal = torch.eye(4)[:2].T.reshape(1, 4, 1, 2)
    spherical = bislerp(orthogonal, 4, 1).norm(dim=1)
    torch.testing.assert_close(spherical, torch.ones_like(spherical))
    linear = torch.nn.functional.interpolate(orthogonal, size=(1, 4), mode="bilinear").norm(dim=1)
    assert linear.min() < 0.8
    constant = torch.randn(1, 4, 1, 1).expand(1, 4, 3, 3)
    torch.testing.assert_close(bislerp(constant, 5, 6), constant[..., :1, :1].expand(1, 4, 6, 5))
