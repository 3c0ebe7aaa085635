"""ComfyUI's UI-format files run headless on the demo models, and the PNGs written carry ComfyUI's formats.

`comfy_ui/default.json` is ComfyUI's default graph on `tiny-sd15` (64×64, 4 steps);
`comfy_ui/reroute_primitive_bypass.json` is the same picture through a Reroute, a PrimitiveNode seed, a
bypassed LoRA loader and a Note.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from nodegraph import workflow as wf
from nodegraph.cli import main
from nodegraph.comfy_ui_format import to_graph
from nodegraph.registry import Registry

HERE = Path(__file__).parent / "comfy_ui"
PROMPT = "beautiful scenery nature glass bottle landscape, purple galaxy bottle,"
# The API format ComfyUI makes of the default graph ("Save (API)").
API = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 156680208700286, "steps": 4, "cfg": 8, "sampler_name": "euler",
                                               "scheduler": "normal", "denoise": 1, "model": ["4", 0],
                                               "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


def run(path: Path, demo_dir: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code = main(["run", str(path), "--models-dir", str(demo_dir), "--output-dir", str(out), "--json"])
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert code == 0 and result["status"] == "ok", result["errors"]
    return result


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_ui_workflows_make_the_api_formats_image(demo_dir: Path, tmp_path: Path, registry: Registry,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "api.json").write_text(json.dumps(API))
    [expected] = run(tmp_path / "api.json", demo_dir, tmp_path / "out", capsys)["files"]
    assert pixels(expected).shape == (64, 64, 3) and pixels(expected).std() > 1
    for name in ("default.json", "reroute_primitive_bypass.json"):
        [made] = run(HERE / name, demo_dir, tmp_path / "out", capsys)["files"]
        np.testing.assert_array_equal(pixels(made), pixels(expected), err_msg=name)

    # The PNG carries ComfyUI's two formats and ours; read back, it is the graph that ran.
    with Image.open(made) as image:
        text = dict(image.text)
    ran = wf.load(HERE / "reroute_primitive_bypass.json", registry)
    assert json.loads(text["nodegraph"]) == ran and wf.load(made) == ran
    prompt = json.loads(text["prompt"])
    assert {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in API.items()}  # the bypassed LoRA loader is passed by
    editor = json.loads(text["workflow"])
    assert {n["type"] for n in editor["nodes"]} == {*(v["class_type"] for v in API.values()), "LoraLoader"}
    sampler = next(n for n in editor["nodes"] if n["type"] == "KSampler")
    assert sampler["widgets_values"] == [156680208700286, "fixed", 4, 8, "euler", "normal", 1]
    assert to_graph(editor, registry.get)["nodes"].keys() == ran["nodes"].keys()
    # ComfyUI's own PNG (no `nodegraph` chunk) opens as its prompt; with the UI format only, as that.
    for keep in (("prompt", "workflow"), ("workflow",)):
        info = PngInfo()
        for key in keep:
            info.add_text(key, text[key])
        Image.open(made).save(tmp_path / "comfy.png", pnginfo=info)
        [again] = run(tmp_path / "comfy.png", demo_dir, tmp_path / "out", capsys)["files"]
        np.testing.assert_array_equal(pixels(again), pixels(expected), err_msg=str(keep))


def test_a_png_written_before_still_runs(demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Older PNGs hold our workflow in `workflow`, beside no `prompt`."""
    ours = wf.lower_comfy_api(API)
    info = PngInfo()
    info.add_text("workflow", json.dumps(ours))
    info.add_text("parameters", "{}")
    Image.new("RGB", (64, 64)).save(tmp_path / "old.png", pnginfo=info)
    assert wf.load(tmp_path / "old.png") == ours
    [made] = run(tmp_path / "old.png", demo_dir, tmp_path / "out", capsys)["files"]
    assert pixels(made).std() > 1
