"""IP-Adapter beyond the basic case: Plus (a Resampler on the encoder's penultimate hidden states, with a blank
image's on the negative side), batches of images (their tokens concatenated, as diffusers does), FaceID refused,
and an IP-Adapter together with a ControlNet. References: diffusers' pipeline code on the same weights
(tests/nodes/test_ipadapter.py's `reference`); the Plus adapters are written here (the demo set is full)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from nodegraph.cli import main
from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodes.engine.checkpoints import load_pipeline
from tests.nodes.test_ipadapter import ADAPTER, graph, reference, run

ROOT = Path(__file__).parents[2]
PLUS, FULL = "tiny-sd15-plus.safetensors", "tiny-sd15-full.safetensors"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 32×32 pictures (the demo encoder's size), face.png as test_ipadapter.py's."""
    folder = tmp_path_factory.mktemp("input")
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "face.png")
    other = np.zeros((32, 32, 3), dtype=np.uint8)
    other[:, :16] = (250, 40, 10)
    Image.fromarray(other).save(folder / "other.png")
    return folder


@pytest.fixture(scope="module")
def models(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with an IP-Adapter Plus and Full for tiny-sd15, and a FaceID-shaped and a mis-sized Plus."""
    from nodes.engine.demo_ipadapter import write_adapter

    root = tmp_path_factory.mktemp("plus-models")
    unet = load_pipeline(demo_dir / "checkpoints" / "tiny-sd15").unet
    write_adapter(root / "ipadapter" / PLUS, 0, "sd15", unet, "plus")
    write_adapter(root / "ipadapter" / FULL, 0, "sd15", unet, "full")
    state = load_file(root / "ipadapter" / PLUS)
    state["image_proj.proj_in.weight"] = torch.zeros(64, 48)  # for a 48-wide encoder
    save_file(state, root / "ipadapter" / "wide-plus.safetensors")
    basic = load_file(demo_dir / "ipadapter" / ADAPTER)
    faceid = {k: v for k, v in basic.items() if k.startswith("ip_adapter.")}
    faceid.update({"image_proj.proj.0.weight": torch.zeros(64, 32), "image_proj.proj.2.weight": torch.zeros(128, 64),
                   "image_proj.norm.weight": torch.ones(32)})
    save_file(faceid, root / "ipadapter" / "faceid.safetensors")
    return root


@pytest.fixture(scope="module")
def shared(registry: Registry, demo_dir: Path, models: Path, inputs: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Executor:
    return Executor(registry, Settings(models_dirs=(models, demo_dir), input_dir=inputs,
                                       output_dir=tmp_path_factory.mktemp("out")))


def batched(wf: dict[str, Any]) -> dict[str, Any]:
    """The graph with face.png and other.png as one IMAGE batch into IPAdapterApply."""
    wf["nodes"]["image2"] = {"type": "LoadImage", "inputs": {"image": "other.png"}}
    wf["nodes"]["batch"] = {"type": "ImageBatch", "inputs": {"image1": ["image", "IMAGE"],
                                                             "image2": ["image2", "IMAGE"]}}
    wf["nodes"]["apply"]["inputs"]["image"] = ["batch", 0]
    return wf


@pytest.mark.parametrize("adapter", [PLUS, FULL])
def test_ipadapter_plus_and_full_sample_as_diffusers(shared: Executor, demo_dir: Path, models: Path, inputs: Path,
                                                     adapter: str) -> None:
    ours = run(shared, 0.8, adapter=adapter)
    want = reference(demo_dir, inputs, 0.8, adapters=models / "ipadapter", adapter=adapter, ours=ours)
    torch.testing.assert_close(ours.nodes["show"].outputs["value"].samples, want, atol=1e-5, rtol=1e-5)
    assert (want - reference(demo_dir, inputs, None)).abs().mean() > 0.05  # the image prompt counts
    # The recipe carries the penultimate hidden states (images, tokens, width) and a blank image's, not zeros.
    result = shared.run(graph(0.8, adapter=adapter))
    use = result.nodes["apply"].outputs["MODEL"].ip_adapter
    assert use.shape == (1, 17, 32) and use.negative and use.negative != bytes(len(use.negative))


@pytest.mark.parametrize("adapter", [ADAPTER, PLUS])
def test_a_batch_of_images_concatenates_their_tokens_as_diffusers_does(
        shared: Executor, demo_dir: Path, models: Path, inputs: Path, adapter: str) -> None:
    folder = models / "ipadapter" if adapter == PLUS else None
    result = shared.run(batched(graph(0.8, adapter=adapter)))
    assert result.status == "ok", result.errors
    want = reference(demo_dir, inputs, 0.8, adapters=folder, adapter=adapter, pictures=("face.png", "other.png"),
                     ours=result)
    torch.testing.assert_close(result.nodes["show"].outputs["value"].samples, want, atol=1e-5, rtol=1e-5)
    one = reference(demo_dir, inputs, 0.8, adapters=folder, adapter=adapter)
    assert (want - one).abs().mean() > 0.01  # the second image counts


def test_image_batch_resizes_the_second_batch_to_the_first(shared: Executor, inputs: Path) -> None:
    Image.new("RGB", (48, 16), (0, 200, 0)).save(inputs / "wide.png")
    wf = {"format": "nodegraph/1", "nodes": {
        "a": {"type": "LoadImage", "inputs": {"image": "face.png"}},
        "b": {"type": "LoadImage", "inputs": {"image": "wide.png"}},
        "batch": {"type": "ImageBatch", "inputs": {"image1": ["a", "IMAGE"], "image2": ["b", "IMAGE"]}},
        "show": {"type": "Show", "inputs": {"value": ["batch", 0]}}}}
    result = shared.run(wf)
    assert result.status == "ok", result.errors
    pixels = result.nodes["show"].outputs["value"].pixels
    assert pixels.shape == (2, 32, 32, 3)
    assert (pixels[0] == np.asarray(Image.open(inputs / "face.png"))).all() and (pixels[1] == (0, 200, 0)).all()


def test_faceid_and_mis_sized_adapters_are_named(shared: Executor) -> None:
    result = shared.run(graph(1.0, adapter="faceid.safetensors"))
    assert [(e.node_id, e.input, e.code) for e in result.errors] == [("ipa", "ipadapter_file", "bad_ipadapter")]
    assert "FaceID" in result.errors[0].message and "faceid.safetensors" in result.errors[0].message
    result = shared.run(graph(1.0, adapter="wide-plus.safetensors"))
    assert [(e.node_id, e.input, e.code) for e in result.errors] == [("apply", "clip_vision", "wrong_model")]
    assert "32-wide hidden states" in result.errors[0].message and "48-wide" in result.errors[0].message


WORKFLOW = ROOT / "workflows" / "ipadapter_controlnet.json"


def test_ipadapter_with_a_controlnet(registry: Registry, demo_dir: Path, demo_input: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Both at once compose: ControlNet strength 0 is the IP-Adapter alone, IP-Adapter weight 0 the ControlNet
    alone, and together they differ from either. The workflow also runs headless."""
    executor = Executor(registry, Settings(models_dirs=(demo_dir,), input_dir=demo_input, output_dir=tmp_path))

    def sample(ip_weight: float | None, strength: float | None) -> torch.Tensor:
        """None: that part left out of the graph."""
        wf = json.loads(WORKFLOW.read_text())
        if strength is None:
            wf["nodes"]["11"]["inputs"].update(positive=["6", 0], negative=["7", 0])
        else:
            wf["nodes"]["9"]["inputs"]["strength"] = strength
        if ip_weight is None:
            wf["nodes"]["11"]["inputs"]["model"] = ["1", "MODEL"]
        else:
            wf["nodes"]["5"]["inputs"]["weight"] = ip_weight
        wf["nodes"]["show"] = {"type": "Show", "inputs": {"value": ["11", 0]}}
        result = executor.run(wf)
        assert result.status == "ok", result.errors
        out: torch.Tensor = result.nodes["show"].outputs["value"].samples
        return out

    both, ip_only, cn_only, neither = sample(0.8, 0.9), sample(0.8, None), sample(None, 0.9), sample(None, None)
    torch.testing.assert_close(sample(0.8, 0.0), ip_only, atol=1e-6, rtol=0)
    torch.testing.assert_close(sample(0.0, 0.9), cn_only, atol=1e-5, rtol=1e-5)
    for other in (ip_only, cn_only, neither):
        assert (both - other).abs().mean() > 0.02
    assert (ip_only - neither).abs().mean() > 0.02 and (cn_only - neither).abs().mean() > 0.02
    code = main(["run", str(WORKFLOW), "--models-dir", str(demo_dir), "--input-dir", str(demo_input),
                 "--output-dir", str(tmp_path / "cli"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["status"] == "ok", result["errors"]
    assert result["files"]
