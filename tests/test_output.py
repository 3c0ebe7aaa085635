"""SaveImage and PreviewImage: names, pixels, no overwrites, confinement, embedded workflows.

Images come from `MakeImage`, a node in a pack written to a temporary folder: deterministic
pixels from a seed, with the params (prompt, seed, steps) a sampler would attach.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from nodegraph import workflow as wf
from nodegraph.cli import main
from nodegraph.executor import Executor, RunResult
from nodegraph.registry import Registry, load_registry
from nodegraph.settings import Settings
from nodegraph.validate import validate
from tests.conftest import workflow

PACK = '''
"""MakeImage: a batch of deterministic 6x8 images from a seed."""
from typing import Any

import numpy as np

from nodegraph.context import Context
from nodegraph.schema import Input, Node, Output
from nodes.engine.images import ImageBatch


class MakeImage(Node):
    type = "MakeImage"
    version = "1.0.0"
    inputs = (Input("seed", "INT", default=0), Input("batch", "INT", default=1, min=1, max=8),
              Input("prompt", "STRING", default="a cat"))
    outputs = (Output("images", "IMAGE"),)

    def run(self, ctx: Context, seed: int, batch: int, prompt: str) -> dict[str, Any]:
        pixels = np.random.default_rng(seed).integers(0, 256, (batch, 6, 8, 3), dtype=np.uint8)
        return {"images": ImageBatch(pixels, {"prompt": prompt, "seed": seed, "steps": 20})}


NODES = [MakeImage]
'''
PARAMS = {"prompt": "a cat ☕", "seed": 1, "steps": 20}


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("imagepack")
    (folder / "imagepack.py").write_text(PACK, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def registry(pack: Path) -> Registry:
    """Overrides conftest's registry (so its `executor` fixture uses this one): built-ins + MakeImage."""
    return load_registry([pack])


def saving(prefix: Any = "nodegraph", batch: int = 2, node_type: str = "SaveImage") -> dict[str, Any]:
    save: dict[str, Any] = {"type": node_type, "inputs": {"images": ["1", 0]}}
    if node_type == "SaveImage":
        save["inputs"]["filename_prefix"] = prefix
    return workflow({"1": {"type": "MakeImage", "inputs": {"seed": 1, "batch": batch, "prompt": "a cat ☕"}},
                     "2": save})


# ComfyUI's API format of `saving()`: a type ComfyUI lacks keeps our name as its class_type.
COMFY_PROMPT = {"1": {"class_type": "MakeImage", "inputs": {"seed": 1, "batch": 2, "prompt": "a cat ☕"}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "nodegraph"}}}


def comfy_workflow(path: str | Path) -> dict[str, Any]:
    """The UI-format `workflow` chunk, after checking the parts ComfyUI's editor needs to open it."""
    ui = text_of(path)["workflow"]
    assert [(n["id"], n["type"]) for n in ui["nodes"]] == [(1, "MakeImage"), (2, "SaveImage")]
    assert ui["links"] == [[1, 1, 0, 2, 0, "IMAGE"]]
    [make, save] = ui["nodes"]
    assert make["outputs"] == [{"name": "IMAGE", "type": "IMAGE", "links": [1], "slot_index": 0}]
    assert save["inputs"] == [{"name": "images", "type": "IMAGE", "link": 1}]
    assert save["widgets_values"] == ["nodegraph"] and make["widgets_values"] == [1, 2, "a cat ☕"]
    assert all(len(n["pos"]) == 2 and len(n["size"]) == 2 for n in ui["nodes"])
    return ui


def pixels_of(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def text_of(path: str | Path) -> dict[str, Any]:
    with Image.open(path) as image:
        return {key: json.loads(value) for key, value in image.text.items()}


def errors(result: RunResult) -> list[tuple[str | None, str | None, str]]:
    return [(p.node_id, p.input, p.code) for p in result.errors]


def test_save_writes_one_png_per_image(executor: Executor, settings: Settings) -> None:
    result = executor.run(saving(batch=2))
    out = settings.output_dir
    assert result.status == "ok"
    assert result.files == [str(out / "nodegraph_00001_.png"), str(out / "nodegraph_00002_.png")]
    images = result.nodes["2"].outputs["images"]
    assert images is result.nodes["1"].outputs["images"]  # passed through, so it can chain
    for path, pixels in zip(result.files, images.pixels, strict=True):
        np.testing.assert_array_equal(pixels_of(path), pixels)


def test_the_built_in_pack_has_the_output_nodes() -> None:
    builtin = load_registry()
    for name in ("SaveImage", "PreviewImage"):
        node = builtin.get(name)
        assert node is not None and node.output_node and node.category == "image"


def test_the_counter_never_overwrites(registry: Registry, settings: Settings) -> None:
    out = settings.output_dir
    out.mkdir()
    for name in ("nodegraph_00007_.png", "other_00050_.png", "nodegraph_00090_.jpg", "nodegraph_00080_x.png"):
        (out / name).write_bytes(b"keep")
    first = Executor(registry, settings).run(saving(batch=2))
    second = Executor(registry, settings).run(saving(batch=1))  # a fresh executor: nothing cached
    assert [Path(f).name for f in first.files + second.files] == [
        "nodegraph_00008_.png", "nodegraph_00009_.png", "nodegraph_00010_.png"]
    assert (out / "nodegraph_00007_.png").read_bytes() == b"keep"


@pytest.mark.parametrize("prefix, written", [
    ("portraits/cat", "portraits/cat_00001_.png"),
    ("portraits/2024/cat", "portraits/2024/cat_00001_.png"),
    ("./cat", "cat_00001_.png"),
    ("a\\b", "a/b_00001_.png"),
])
def test_prefixes_may_name_subfolders(executor: Executor, settings: Settings, prefix: str, written: str) -> None:
    result = executor.run(saving(prefix, batch=1))
    assert result.status == "ok" and result.files == [str(settings.output_dir / written)]
    assert (settings.output_dir / written).is_file()


ESCAPES = ["../x", "a/../../x", "a/..", "..", "/abs/x", "C:\\x", "\\\\server\\share\\x", "portraits/", "",
           "a\x00b"]


@pytest.mark.parametrize("prefix", ESCAPES)
def test_escaping_prefixes_are_refused_at_validation(registry: Registry, settings: Settings, prefix: str) -> None:
    for with_settings in (settings, None):  # the text alone is enough to refuse these
        _, problems = validate(saving(prefix), registry, with_settings)
        assert [(p.node_id, p.input, p.code) for p in problems] == [("2", "filename_prefix", "invalid_value")]


def test_a_symlink_out_of_the_output_folder_is_refused(registry: Registry, settings: Settings,
                                                       tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    settings.output_dir.mkdir()
    (settings.output_dir / "escape").symlink_to(elsewhere)
    (settings.output_dir / "real").mkdir()
    (settings.output_dir / "inside").symlink_to(settings.output_dir / "real")
    _, problems = validate(saving("escape/x"), registry, settings)
    assert [(p.input, p.code) for p in problems] == [("filename_prefix", "invalid_value")]
    assert "outside the output folder" in problems[0].message
    result = Executor(registry, settings).run(saving("inside/x", batch=1))  # a link that stays inside is fine
    assert result.status == "ok" and (settings.output_dir / "real" / "x_00001_.png").is_file()


@pytest.mark.parametrize("prefix", [*ESCAPES, "escape/x"])
def test_escaping_prefixes_are_refused_at_run_time(registry: Registry, settings: Settings, tmp_path: Path,
                                                   prefix: str) -> None:
    settings.output_dir.mkdir()
    (settings.output_dir / "escape").symlink_to(tmp_path)
    linked = saving(["3", 0])  # linked from a String node: only known when it runs
    linked["nodes"]["3"] = {"type": "String", "inputs": {"value": prefix}}
    result = Executor(registry, settings).run(linked)
    assert result.status == "error" and errors(result) == [("2", "filename_prefix", "invalid_value")]
    assert not list(tmp_path.rglob("*.png")) and not Path("/abs").exists()


def test_an_unwritable_output_folder_is_a_node_error(registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    result = Executor(registry, Settings(output_dir=tmp_path / "file")).run(saving())
    assert errors(result) == [("2", None, "write_failed")] and "cannot write" in result.errors[0].message


def test_a_value_that_is_not_an_image_is_a_node_error(executor: Executor) -> None:
    flow = workflow({"1": {"type": "Int", "inputs": {"value": 3}}, "3": {"type": "Show", "inputs": {"value": ["1", 0]}},
                     "2": {"type": "SaveImage", "inputs": {"images": ["3", 0]}}})
    assert errors(executor.run(flow)) == [("2", "images", "wrong_type")]


def test_pngs_embed_the_workflow_and_the_parameters(executor: Executor) -> None:
    flow = saving(batch=2)
    result = executor.run(flow)
    for path in result.files:
        assert text_of(path) == {"nodegraph": flow, "prompt": COMFY_PROMPT, "workflow": comfy_workflow(path),
                                 "parameters": PARAMS}


def test_preview_writes_to_the_temp_folder(executor: Executor, settings: Settings) -> None:
    flow = saving(batch=2, node_type="PreviewImage")
    result = executor.run(flow)
    temp = settings.temp_dir
    assert result.status == "ok"
    assert result.files == [str(temp / "preview_00001_.png"), str(temp / "preview_00002_.png")]
    assert result.nodes["2"].outputs["images"] is result.nodes["1"].outputs["images"]
    np.testing.assert_array_equal(pixels_of(result.files[1]), result.nodes["1"].outputs["images"].pixels[1])
    assert text_of(result.files[0])["nodegraph"] == flow
    assert text_of(result.files[0])["parameters"] == PARAMS
    assert [p.name for p in settings.output_dir.iterdir()] == [temp.name]


def test_preview_refuses_a_temp_folder_linked_out_of_the_output_folder(executor: Executor, settings: Settings,
                                                                      tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    settings.output_dir.mkdir()
    settings.temp_dir.symlink_to(elsewhere)
    result = executor.run(saving(node_type="PreviewImage"))
    assert errors(result) == [("2", None, "outside_output_folder")]
    assert "leads outside the output folder" in result.errors[0].message
    assert list(elsewhere.iterdir()) == []


def test_a_png_opens_as_the_workflow_that_made_it(pack: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "outputs"
    source = tmp_path / "flow.json"
    wf.save(saving(batch=1), source)
    common = ["--nodes-dir", str(pack), "--output-dir", str(out), "--json"]
    assert main(["run", str(source), "--set", "1.seed=7", *common]) == 0
    [first] = json.loads(capsys.readouterr().out)["files"]
    ran = saving(batch=1)
    ran["nodes"]["1"]["inputs"]["seed"] = 7  # the PNG holds the workflow as run, overrides included
    assert wf.load(first) == ran

    assert main(["run", first, *common]) == 0
    [second] = json.loads(capsys.readouterr().out)["files"]
    assert Path(second).name == "nodegraph_00002_.png"
    np.testing.assert_array_equal(pixels_of(second), pixels_of(first))
    assert main(["validate", first, "--nodes-dir", str(pack)]) == 0


def test_a_comfyui_png_opens_as_its_api_prompt(tmp_path: Path) -> None:
    info = PngInfo()
    info.add_text("workflow", json.dumps({"nodes": [], "links": []}))  # ComfyUI's editor format
    info.add_text("prompt", json.dumps({"4": {"class_type": "Int", "inputs": {"value": 2}}}))
    Image.new("RGB", (4, 4)).save(tmp_path / "comfy.png", pnginfo=info)
    assert wf.load(tmp_path / "comfy.png") == {"format": "nodegraph/1", "ui": {},
                                               "nodes": {"4": {"type": "Int", "inputs": {"value": 2},
                                                               "ui": {"pos": [40, 40]}}}}


def png_bytes(text: dict[str, str]) -> bytes:
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def with_fixed_crcs(png: bytes) -> bytes:
    """The PNG with every chunk's CRC recomputed, so an edited chunk still reads as intact."""
    out, at = bytearray(png[:8]), 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at:at + 4])
        body = png[at + 4:at + 8 + length]
        out += png[at:at + 4] + body + struct.pack(">I", zlib.crc32(body))
        at += 12 + length
    return bytes(out)


SAVED = png_bytes({"workflow": json.dumps(workflow({}))})


@pytest.mark.parametrize("data, code, message", [
    (png_bytes({}), "no_workflow", "without an embedded workflow"),
    (png_bytes({"parameters": "{}"}), "no_workflow", "without an embedded workflow"),
    (wf.PNG_SIGNATURE + b"\x00garbage" * 10, "no_workflow", "not a readable PNG"),
    (SAVED[:40], "no_workflow", "not a readable PNG"),  # cut off inside the text chunk
    (SAVED.replace(b'"nodes"', b'"nodez"'), "no_workflow", "not a readable PNG"),  # its CRC no longer matches
    (with_fixed_crcs(SAVED.replace(b'"nodes"', b'{{{{{{{')), "invalid_json", "embedded in the PNG: malformed"),
], ids=["no chunk", "other chunks", "garbage", "truncated", "bad crc", "bad json"])
def test_pngs_without_a_readable_workflow_are_workflow_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              data: bytes, code: str, message: str) -> None:
    (tmp_path / "bad.png").write_bytes(data)
    with pytest.raises(wf.WorkflowError, match=message) as err:
        wf.load(tmp_path / "bad.png")
    assert err.value.code == code
    assert main(["validate", str(tmp_path / "bad.png"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["errors"][0]["code"] == code
