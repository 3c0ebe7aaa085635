"""Image, mask and latent nodes: LoadImage(Mask), inpainting, the example workflows (resizing: test_upscale)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.cli import main
from nodegraph.context import Context, NodeFailure
from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodegraph.workflow import load as load_workflow
from nodes.engine.demo_input import HOLE
from nodes.engine.values import Latent, MaskBatch
from nodes.inpaint import SetLatentNoiseMask, grow_mask
from nodes.load_image import LoadImage, LoadImageMask
from tests.conftest import Recorder, workflow

ROOT = Path(__file__).parents[2]
EXAMPLES = ("img2img.json", "inpaint.json", "hires_fix.json")
RNG = np.random.default_rng(0)


def ctx(settings: Settings) -> Context:
    return Context("job", "1", settings)


def pixels(height: int, width: int, batch: int = 1) -> np.ndarray:
    return RNG.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)


def save(settings: Settings, name: str, image: Image.Image, **options: Any) -> np.ndarray:
    path = settings.input_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return np.asarray(image)


def load(settings: Settings, name: str) -> tuple[np.ndarray, torch.Tensor]:
    out = LoadImage().run(ctx(settings), name)
    return out["IMAGE"].pixels, out["MASK"].mask


# LoadImage and LoadImageMask


def test_load_image_gives_the_pixels_and_one_minus_alpha_as_the_mask(settings: Settings) -> None:
    rgba = save(settings, "a.png", Image.fromarray(RNG.integers(0, 256, (5, 7, 4), dtype=np.uint8), "RGBA"))
    image, mask = load(settings, "a.png")
    assert image.shape == (1, 5, 7, 3) and np.array_equal(image[0], rgba[..., :3])
    torch.testing.assert_close(mask, torch.from_numpy(1 - rgba[None, ..., 3] / 255).float())


def test_without_alpha_the_mask_is_64_by_64_zeros(settings: Settings) -> None:
    rgb = save(settings, "rgb.png", Image.fromarray(pixels(6, 10)[0]))
    image, mask = load(settings, "rgb.png")
    assert np.array_equal(image[0], rgb)
    assert mask.shape == (1, 64, 64) and not mask.any()


def test_a_palette_transparency_is_a_mask(settings: Settings) -> None:
    indices = np.array([[0, 1], [1, 2]], np.uint8)
    palette = Image.fromarray(indices, "P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    save(settings, "p.png", palette, transparency=1)
    image, mask = load(settings, "p.png")
    assert image[0, 0, 0].tolist() == [255, 0, 0]
    assert mask[0].tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_the_exif_orientation_is_applied(settings: Settings) -> None:
    raw = pixels(2, 4)[0]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    save(settings, "turned.png", Image.fromarray(raw), exif=exif)
    image, _ = load(settings, "turned.png")
    assert np.array_equal(image[0], np.rot90(raw, k=-1))


def test_frames_are_a_batch_and_frames_of_another_size_are_left_out(settings: Settings) -> None:
    frames = [Image.fromarray(one) for one in pixels(6, 8, batch=3)]
    odd = Image.fromarray(pixels(5, 8)[0])
    save(settings, "pages.tiff", frames[0], save_all=True, append_images=[frames[1], odd, frames[2]])
    image, mask = load(settings, "pages.tiff")
    assert np.array_equal(image, np.stack([np.asarray(f) for f in frames]))
    assert mask.shape == (3, 64, 64)


def test_load_image_mask_reads_one_channel(settings: Settings) -> None:
    rgba = save(settings, "m.png", Image.fromarray(RNG.integers(0, 256, (4, 6, 4), dtype=np.uint8), "RGBA"))
    for index, channel in enumerate(("red", "green", "blue")):
        mask = LoadImageMask().run(ctx(settings), "m.png", channel)["MASK"].mask
        torch.testing.assert_close(mask, torch.from_numpy(rgba[None, ..., index] / 255).float())
    alpha = LoadImageMask().run(ctx(settings), "m.png", "alpha")["MASK"].mask
    torch.testing.assert_close(alpha, torch.from_numpy(1 - rgba[None, ..., 3] / 255).float())
    save(settings, "rgb.png", Image.fromarray(pixels(4, 6)[0]))  # no alpha: nothing transparent, nothing masked
    assert not LoadImageMask().run(ctx(settings), "rgb.png", "alpha")["MASK"].mask.any()


def test_the_choices_are_the_image_files_in_the_input_folder(registry: Registry, settings: Settings) -> None:
    for name in ("a.png", "sub/b.jpg", "notes.txt", ".hidden.png", ".cache/c.png"):
        (settings.input_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (settings.input_dir / name).write_bytes(b"x")
    assert settings.input_files() == ["a.png", "sub/b.jpg"]
    catalog = registry.catalog(settings)["nodes"]
    for node in ("LoadImage", "LoadImageMask"):
        assert catalog[node]["inputs"][0]["choices"] == ["a.png", "sub/b.jpg"]
    assert catalog["LoadImageMask"]["inputs"][1]["choices"] == ["alpha", "red", "green", "blue"]


def load_workflow_of(name: str) -> dict[str, Any]:
    return workflow({"1": {"type": "LoadImage", "inputs": {"image": name}},
                     "2": {"type": "Show", "inputs": {"value": ["1", "MASK"]}}})


def test_unreadable_files_and_bad_names_are_errors_on_the_image_input(
        executor: Executor, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.input_dir.mkdir(parents=True)
    (settings.input_dir / "fake.png").write_text("not an image")
    good = Image.fromarray(pixels(32, 32)[0])
    good.save(settings.input_dir / "cut.png")
    (settings.input_dir / "cut.png").write_bytes((settings.input_dir / "cut.png").read_bytes()[:200])
    Image.fromarray(pixels(40, 40)[0]).save(settings.input_dir / "big.png")
    monkeypatch.setattr("nodes.load_image.MAX_PIXELS", 32 * 32)
    for name, code in (("fake.png", "bad_image"), ("cut.png", "bad_image"), ("big.png", "too_large")):
        result = executor.run(load_workflow_of(name))
        assert result.status == "error", name
        [error] = result.errors
        assert (error.node_id, error.input, error.code) == ("1", "image", code), error
        assert name in error.message
    for name in ("../outside.png", "/etc/passwd", "missing.png"):
        result = executor.run(load_workflow_of(name))
        assert result.status == "invalid" and result.errors[0].code == "not_a_choice", name
        assert (result.errors[0].node_id, result.errors[0].input) == ("1", "image")


def test_a_decompression_bomb_is_too_large_and_a_linked_name_no_file_can_have_is_a_bad_name(
        executor: Executor, settings: Settings) -> None:
    from tests.server.test_api_uploads import claimed_png

    settings.input_dir.mkdir(parents=True)
    (settings.input_dir / "bomb.png").write_bytes(claimed_png(15_000, 15_000))  # past Pillow's own limit
    result = executor.run(load_workflow_of("bomb.png"))
    [error] = result.errors
    assert (error.node_id, error.input, error.code) == ("1", "image", "too_large") and "bomb.png" in error.message
    long = "x" * 300 + "{a}"  # a name made at run time, so only the run sees it
    wf = workflow({"0": {"type": "Format", "inputs": {"template": long, "a": ".png"}},
                   "1": {"type": "LoadImage", "inputs": {"image": ["0", 0]}},
                   "2": {"type": "Show", "inputs": {"value": ["1", "IMAGE"]}}})
    [error] = executor.run(wf).errors
    assert (error.node_id, error.input, error.code) == ("1", "image", "bad_name")
    assert str(settings.input_dir) not in error.message


def test_a_changed_file_loads_again(executor: Executor, settings: Settings) -> None:
    save(settings, "x.png", Image.fromarray(pixels(8, 8)[0]))
    first = executor.run(load_workflow_of("x.png"), Recorder())
    events = Recorder()
    executor.run(load_workflow_of("x.png"), events)
    assert events.ran() == []  # unchanged: cached
    save(settings, "x.png", Image.fromarray(RNG.integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA"))
    second = executor.run(load_workflow_of("x.png"), events)
    assert events.ran() == ["1", "2"]
    assert second.nodes["1"].outputs["MASK"].mask.shape != first.nodes["1"].outputs["MASK"].mask.shape


# Masks and inpainting


def test_set_latent_noise_mask() -> None:
    latent = Latent(torch.randn(2, 4, 8, 8))
    mask = MaskBatch(torch.rand(1, 64, 64))
    out = SetLatentNoiseMask().run(ctx(Settings()), latent, mask)["LATENT"]
    assert out.noise_mask is not None and torch.equal(out.noise_mask, mask.mask[:, None])
    assert torch.equal(out.samples, latent.samples)
    with pytest.raises(NodeFailure) as failure:
        SetLatentNoiseMask().run(ctx(Settings()), latent, MaskBatch(torch.rand(3, 64, 64)))
    assert (failure.value.input, failure.value.code) == ("mask", "wrong_batch")


@pytest.mark.parametrize("grow_by", [0, 1, 2, 5, 6, 7])
def test_the_mask_grows_by_comfyuis_window(grow_by: int) -> None:
    mask = (torch.rand(1, 1, 12, 10) > 0.9).float() * 0.9  # rounded to 1 before growing
    grown = grow_mask(mask, grow_by)
    reach = math.ceil((grow_by - 1) / 2) if grow_by else 0  # up and left; the rest of the window down and right
    rounded = mask.round()[0, 0]
    for i in range(12):
        for j in range(10):
            size = max(grow_by, 1)
            window = rounded[max(0, i - reach): i - reach + size, max(0, j - reach): j - reach + size]
            assert grown[0, 0, i, j] == window.max(), (i, j)


def test_a_single_pixel_grows_into_a_six_pixel_square() -> None:
    mask = torch.zeros(1, 1, 16, 16)
    mask[0, 0, 8, 8] = 1
    rows, cols = grow_mask(mask, 6)[0, 0].nonzero().T
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (6, 11, 6, 11)


@pytest.fixture(scope="module")
def shared(registry: Registry, demo_dir: Path, demo_input: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    return Executor(registry, Settings(models_dirs=(demo_dir,), output_dir=tmp_path_factory.mktemp("out"),
                                       input_dir=demo_input))


def run(executor: Executor, nodes: dict[str, Any]) -> Any:
    result = executor.run(workflow(nodes))
    assert result.status == "ok", result.errors
    return result


def inpaint_graph(latent_node: dict[str, Any], sampler: str = "euler", denoise: float = 1.0) -> dict[str, Any]:
    return {
        "1": {"type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15"}},
        "2": {"type": "LoadImage", "inputs": {"image": "demo.png"}},
        "3": {"type": "CLIPTextEncode", "inputs": {"text": "a moon", "clip": ["1", "CLIP"]}},
        "4": {"type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", "CLIP"]}},
        "5": {"type": "VAEEncode", "inputs": {"pixels": ["2", "IMAGE"], "vae": ["1", "VAE"]}},
        "6": latent_node,
        "7": {"type": "KSampler", "inputs": {
            "model": ["1", "MODEL"], "seed": 5, "steps": 4, "cfg": 7.0, "sampler_name": sampler, "scheduler": "normal",
            "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["6", "LATENT"], "denoise": denoise}},
        "8": {"type": "Show", "inputs": {"value": ["7", "LATENT"]}},
    }


SET_MASK = {"type": "SetLatentNoiseMask", "inputs": {"samples": ["5", "LATENT"], "mask": ["2", "MASK"]}}
FOR_INPAINT = {"type": "VAEEncodeForInpaint", "inputs": {"pixels": ["2", "IMAGE"], "vae": ["1", "VAE"],
                                                         "mask": ["2", "MASK"], "grow_mask_by": 6}}


@pytest.mark.parametrize("latent_node, sampler, denoise", [
    (SET_MASK, "euler", 1.0), (SET_MASK, "dpmpp_2m", 0.6), (SET_MASK, "euler_ancestral", 1.0),
    (FOR_INPAINT, "euler", 1.0)])
def test_inpainting_leaves_the_unmasked_latent_as_it_was(shared: Executor, latent_node: dict[str, Any], sampler: str,
                                                         denoise: float) -> None:
    result = run(shared, inpaint_graph(latent_node, sampler, denoise))
    before, after = result.nodes["6"].outputs["LATENT"], result.nodes["7"].outputs["LATENT"]
    assert before.noise_mask is not None and after.samples.shape == before.samples.shape == (1, 4, 8, 8)
    # The sampler's view of the mask: the noise mask resized to the latent (as ComfyUI, bilinearly).
    mask = torch.nn.functional.interpolate(before.noise_mask, size=(8, 8), mode="bilinear")[0, 0]
    kept, repainted = mask == 0, mask == 1
    assert kept.sum() >= 20 and repainted.sum() >= 9
    torch.testing.assert_close(after.samples[..., kept], before.samples[..., kept], atol=1e-5, rtol=0)
    assert (after.samples[..., repainted] - before.samples[..., repainted]).abs().mean() > 0.1


def test_vae_encode_for_inpaint_greys_the_masked_pixels_and_grows_the_mask(
        shared: Executor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nodes.latent
    from nodes.engine.demo_input import demo_image

    left, top, right, bottom = HOLE
    hole = torch.zeros(64, 64, dtype=torch.bool)
    hole[top:bottom, left:right] = True
    other = demo_image()
    other[top:bottom, left:right, :3] = RNG.integers(0, 256, (bottom - top, right - left, 3))
    Image.fromarray(demo_image(), "RGBA").save(tmp_path / "demo.png")
    Image.fromarray(other, "RGBA").save(tmp_path / "other.png")
    executor = Executor(shared.registry, Settings(models_dirs=shared.settings.models_dirs, input_dir=tmp_path,
                                                  output_dir=tmp_path / "out"))
    seen: list[torch.Tensor] = []
    encode = nodes.latent.encode_pixels
    monkeypatch.setattr(nodes.latent, "encode_pixels", lambda ctx, x, vae: seen.append(x) or encode(ctx, x, vae))
    graph = inpaint_graph(FOR_INPAINT)
    graph["8"]["inputs"]["value"] = ["6", "LATENT"]
    result = run(executor, graph)
    image = torch.from_numpy(result.nodes["2"].outputs["IMAGE"].pixels.copy()).permute(0, 3, 1, 2).float() / 255
    mask = result.nodes["2"].outputs["MASK"].mask
    assert torch.equal(mask[0] == 1, hole) and torch.equal(mask[0] == 0, ~hole)  # demo.png's transparent rectangle
    [x] = seen
    assert (x[..., hole] == 0.5).all()
    torch.testing.assert_close(x[..., ~hole], image[..., ~hole])
    noise_mask = result.nodes["6"].outputs["LATENT"].noise_mask
    grown = torch.zeros(64, 64)
    grown[top - 2: bottom + 3, left - 2: right + 3] = 1  # a 6×6 window: 2 more up and left, 3 down and right
    assert noise_mask.shape == (1, 1, 64, 64) and torch.equal(noise_mask[0, 0], grown)
    # What lies under the mask does not reach the latent: another picture there encodes the same,
    # while a plain VAEEncode of the two differs.
    graph["2"]["inputs"]["image"] = "other.png"
    assert torch.equal(run(executor, graph).nodes["6"].outputs["LATENT"].samples,
                       result.nodes["6"].outputs["LATENT"].samples)
    graph["8"]["inputs"]["value"] = ["5", "LATENT"]
    plain = run(executor, graph).nodes["5"].outputs["LATENT"].samples
    graph["2"]["inputs"]["image"] = "demo.png"
    assert (run(executor, graph).nodes["5"].outputs["LATENT"].samples - plain).abs().max() > 1e-3


@pytest.mark.parametrize("node", ["VAEEncode", "VAEEncodeForInpaint"])
def test_encoders_crop_to_the_latent_grid_centred(shared: Executor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   node: str) -> None:
    import nodes.latent

    odd = pixels(61, 70)[0]
    Image.fromarray(odd).save(tmp_path / "odd.png")
    executor = Executor(shared.registry, Settings(models_dirs=shared.settings.models_dirs, input_dir=tmp_path,
                                                  output_dir=tmp_path / "out"))
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(nodes.latent, "encode_pixels", lambda ctx, x, vae: seen.append(x) or torch.zeros(1, 4, 7, 8))
    graph = inpaint_graph(FOR_INPAINT)
    graph["2"]["inputs"]["image"] = "odd.png"
    encoder = "6" if node == "VAEEncodeForInpaint" else "5"
    graph["8"]["inputs"]["value"] = [encoder, "LATENT"]
    result = run(executor, graph)
    expected = torch.from_numpy(odd[2:58, 3:67].copy()).permute(2, 0, 1).float() / 255  # margins 2|3 and 3|4
    torch.testing.assert_close(seen[0][0], expected)
    if node == "VAEEncodeForInpaint":
        assert result.nodes["6"].outputs["LATENT"].noise_mask.shape == (1, 1, 56, 64)


# The example workflows and the demo image


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_workflows_run_headless(name: str, demo_dir: Path, demo_input: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(ROOT / "workflows" / name), "--models-dir", str(demo_dir), "--input-dir",
                 str(demo_input), "--output-dir", str(tmp_path), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["status"] == "ok", result["errors"]
    [path] = result["files"]
    with Image.open(path) as image:
        assert image.size == (64, 64) and np.asarray(image).std() > 1


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_is_the_same_graph_in_comfyuis_format(name: str, shared: Executor) -> None:
    ours, theirs = load_workflow(ROOT / "workflows" / name), load_workflow(ROOT / "workflows" / "comfyui" / name)
    assert {n: e["type"] for n, e in ours["nodes"].items()} == {n: e["type"] for n, e in theirs["nodes"].items()}
    a, b = shared.run(ours), shared.run(theirs)
    assert a.status == b.status == "ok", a.errors + b.errors
    [save_node] = [n for n, e in ours["nodes"].items() if e["type"] == "SaveImage"]
    decode_node = ours["nodes"][save_node]["inputs"]["images"][0]
    decoded = [r.nodes[decode_node].outputs["IMAGE"] for r in (a, b)]
    assert np.array_equal(decoded[0].pixels, decoded[1].pixels)
    if name == "hires_fix.json":  # a 32×32 first pass, upscaled to 64×64 in the latent, sampled again
        sizes = [a.nodes[n].outputs["LATENT"].samples.shape[-2:] for n in ("6", "7", "8")]
        assert sizes == [(4, 4), (8, 8), (8, 8)]
    if name == "img2img.json":
        assert ours["nodes"]["6"]["inputs"]["denoise"] == theirs["nodes"]["6"]["inputs"]["denoise"] == 0.6


def test_the_demo_image_and_where_models_demo_writes_it(demo_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "demo", "--dir", str(demo_dir), "--input-dir", str(tmp_path / "in")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(tmp_path / "in" / "demo.png")
    image, mask = load(Settings(input_dir=tmp_path / "in"), "demo.png")
    assert image.shape == (1, 64, 64, 3) and image.std() > 20
    left, top, right, bottom = HOLE
    assert float(mask.sum()) == (right - left) * (bottom - top) and mask[0, top:bottom, left:right].all()
    stamp = (tmp_path / "in" / "demo.png").stat().st_mtime_ns
    assert main(["models", "demo", "--dir", str(demo_dir), "--input-dir", str(tmp_path / "in")]) == 0
    assert (tmp_path / "in" / "demo.png").stat().st_mtime_ns == stamp  # the same bytes: not written again
