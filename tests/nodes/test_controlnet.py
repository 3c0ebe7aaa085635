"""ControlNetLoader and ControlNetApplyAdvanced on the demo ControlNets: effect, strength, ranges, stacking, SDXL.

pytest tests/nodes/test_controlnet.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from nodegraph import events as ev
from nodegraph.cli import main
from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodegraph.validate import validate
from nodegraph.workflow import load, lower_comfy_api
from tests.conftest import Recorder

ROOT = Path(__file__).parents[2]
API = ROOT / "workflows" / "comfyui" / "controlnet.json"
OURS = ROOT / "workflows" / "controlnet.json"
SD15_CN = "tiny-sd15-controlnet"


def graph(**changes: Any) -> dict[str, Any]:
    """The ComfyUI API example (hint from a first KSampler pass); changes: {"node.input": value}."""
    api = json.loads(API.read_text())
    for where, value in changes.items():
        node, name = where.split(".")
        api[node]["inputs"][name] = value
    wf = lower_comfy_api(api)
    wf["nodes"]["11"] = {"type": "PreviewImage", "inputs": {"images": ["10", 0]}}
    return wf


def plain(**changes: Any) -> dict[str, Any]:
    """The same graph with the final sampler on the bare conditioning: no ControlNet."""
    wf = graph(**changes)
    wf["nodes"]["9"]["inputs"].update({"positive": ["2", 0], "negative": ["3", 0]})
    return wf


def stacked(second: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A second ControlNetApplyAdvanced after the first; `second` overrides its inputs."""
    wf = graph(**changes)
    wf["nodes"]["12"] = {"type": "ControlNetLoader", "inputs": {"control_net_name": SD15_CN + ".safetensors"}}
    wf["nodes"]["13"] = {"type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["8", 0], "negative": ["8", 1], "control_net": ["12", 0], "image": ["6", 0], "strength": 1.0,
        "start_percent": 0.0, "end_percent": 1.0, **second}}
    wf["nodes"]["9"]["inputs"].update({"positive": ["13", 0], "negative": ["13", 1]})
    return wf


@pytest.fixture(scope="module")
def shared(registry: Registry, demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    return Executor(registry, Settings(models_dirs=(demo_dir,), output_dir=tmp_path_factory.mktemp("out")))


def run(executor: Executor, wf: dict[str, Any], events: Recorder | None = None) -> Any:
    result = executor.run(wf, events if events is not None else Recorder())
    assert result.status == "ok", result.errors
    return result


def sampled(executor: Executor, wf: dict[str, Any], node: str = "9") -> torch.Tensor:
    out: torch.Tensor = run(executor, wf).nodes[node].outputs["LATENT"].samples
    return out


def error(executor: Executor, wf: dict[str, Any]) -> Any:
    result = executor.run(wf, Recorder())
    assert result.status == "error"
    [problem] = result.errors
    return problem.to_json()


# ---------------------------------------------------------------------------------------------- effect


def test_a_controlnet_changes_the_latent_and_strength_zero_equals_none_exactly(shared: Executor) -> None:
    none = sampled(shared, plain())
    controlled = sampled(shared, graph())
    assert torch.isfinite(controlled).all()
    assert (controlled - none).abs().mean() > 0.05
    assert torch.equal(sampled(shared, graph(**{"8.strength": 0.0})), none)
    weaker = sampled(shared, graph(**{"8.strength": 0.4}))
    assert 0 < (weaker - none).abs().mean() < (controlled - none).abs().mean()


def test_the_hint_image_matters(shared: Executor) -> None:
    a = sampled(shared, graph())
    b = sampled(shared, graph(**{"5.seed": 99}))  # another first pass: another hint
    assert (a - b).abs().mean() > 0.01


def test_percent_ranges(shared: Executor) -> None:
    none = sampled(shared, plain())
    full = sampled(shared, graph(**{"8.end_percent": 1.0}))
    for start, end in ((1.0, 1.0), (0.6, 0.3), (0.5, 0.5)):  # ranges that contain no step's sigma
        assert torch.equal(sampled(shared, graph(**{"8.start_percent": start, "8.end_percent": end})), none)
    early = sampled(shared, graph(**{"8.start_percent": 0.0, "8.end_percent": 0.3}))
    late = sampled(shared, graph(**{"8.start_percent": 0.3, "8.end_percent": 1.0}))
    for partial in (early, late):
        assert not torch.equal(partial, none) and not torch.equal(partial, full)
    assert not torch.equal(early, late)


def test_percent_to_sigma_follows_comfyui() -> None:
    from nodes.controlnet import percent_to_sigma
    from nodes.engine.sigmas import DiscreteModel

    model = DiscreteModel.from_betas(0.00085, 0.012)
    assert percent_to_sigma(model, 0.0) == float("inf") and percent_to_sigma(model, 1.0) == 0.0
    assert percent_to_sigma(model, 0.5) == pytest.approx(float(model.sigma(torch.tensor(499.5))))
    assert percent_to_sigma(model, 0.2) > percent_to_sigma(model, 0.8)


def test_two_stacked_controlnets_add_their_residuals(shared: Executor) -> None:
    # The single file holds the folder's weights, so folder @0.5 + file @0.7 is one ControlNet @1.2. One step:
    # the random tiny UNet amplifies float rounding (0.5r + 0.7r vs 1.2r) a hundredfold per later step.
    both = sampled(shared, stacked({"strength": 0.7}, **{"8.strength": 0.5, "9.steps": 1}))
    one = sampled(shared, graph(**{"8.strength": 1.2, "9.steps": 1}))
    torch.testing.assert_close(both, one, atol=1e-3, rtol=0)
    assert (both - sampled(shared, graph(**{"8.strength": 0.5, "9.steps": 1}))).abs().mean() > 0.05
    # A second ControlNet at strength 0, or over an empty range, leaves the first alone exactly.
    first = sampled(shared, graph())
    assert torch.equal(sampled(shared, stacked({"strength": 0.0})), first)
    assert torch.equal(sampled(shared, stacked({"start_percent": 1.0})), first)


def test_combined_conditioning_with_and_without_a_controlnet(shared: Executor) -> None:
    # Two positive entries, one steered: the steered one gets residuals, the other none (zeros).
    wf = graph()
    wf["nodes"]["14"] = {"type": "ConditioningCombine", "inputs": {"conditioning_1": ["8", 0],
                                                                   "conditioning_2": ["2", 0]}}
    wf["nodes"]["9"]["inputs"]["positive"] = ["14", 0]
    unsteered = plain()
    unsteered["nodes"]["14"] = {**wf["nodes"]["14"], "inputs": {"conditioning_1": ["2", 0], "conditioning_2": ["2", 0]}}
    unsteered["nodes"]["9"]["inputs"]["positive"] = ["14", 0]
    half, none = sampled(shared, wf), sampled(shared, unsteered)
    assert torch.isfinite(half).all() and (half - none).abs().mean() > 0.01


def test_the_single_file_loads_to_the_folders_model(shared: Executor) -> None:
    wf = graph(**{"7.control_net_name": SD15_CN + ".safetensors"})
    assert torch.equal(sampled(shared, wf), sampled(shared, graph()))


def test_a_hint_of_another_size_and_batch_is_fitted_to_the_latent(shared: Executor) -> None:
    wf = graph(**{"4.batch_size": 2})
    wf["nodes"]["20"] = {"type": "EmptyLatentImage", "inputs": {"width": 96, "height": 48, "batch_size": 1}}
    wf["nodes"]["5"]["inputs"]["latent_image"] = ["20", 0]  # a 96×48 hint for a batch of two 64×64 latents
    out = sampled(shared, wf)
    none = plain(**{"4.batch_size": 2})
    assert out.shape == (2, 4, 8, 8) and (out - sampled(shared, none)).abs().mean() > 0.01


def test_sdxl(shared: Executor) -> None:
    wf = graph(**{"1.ckpt_name": "tiny-sdxl", "7.control_net_name": "tiny-sdxl-controlnet.safetensors"})
    none = wf.copy()
    none["nodes"] = {**wf["nodes"], "9": {**wf["nodes"]["9"], "inputs": {
        **wf["nodes"]["9"]["inputs"], "positive": ["2", 0], "negative": ["3", 0]}}}
    a, b = sampled(shared, wf), sampled(shared, none)
    assert torch.isfinite(a).all() and (a - b).abs().mean() > 0.05


# ---------------------------------------------------------------------------------------------- errors


def test_a_controlnet_for_another_architecture_is_an_error_naming_the_file(shared: Executor) -> None:
    problem = error(shared, graph(**{"7.control_net_name": "tiny-sdxl-controlnet.safetensors"}))
    assert (problem["node_id"], problem["input"], problem["code"]) == ("8", "control_net", "wrong_controlnet")
    assert "tiny-sdxl-controlnet.safetensors" in problem["message"] and "another architecture" in problem["message"]


def test_the_sampler_checks_the_controlnet_against_the_unet(demo_dir: Path, tmp_path: Path,
                                                            registry: Registry) -> None:
    # Same text width as the model, other block widths: only the UNet's config tells them apart.
    models = tmp_path / "models"
    shutil.copytree(demo_dir / "checkpoints", models / "checkpoints", symlinks=True)
    odd = models / "controlnet" / "odd"
    shutil.copytree(demo_dir / "controlnet" / SD15_CN, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "block_out_channels": [32, 32]}))
    executor = Executor(registry, Settings(models_dirs=(models,), output_dir=tmp_path / "out"))
    problem = error(executor, graph(**{"7.control_net_name": "odd"}))
    assert (problem["node_id"], problem["code"]) == ("9", "wrong_controlnet")
    assert "odd" in problem["message"] and "block_out_channels" in problem["message"]


def test_a_file_that_is_not_a_controlnet_fails_validation(demo_dir: Path, tmp_path: Path, registry: Registry) -> None:
    models = tmp_path / "models"
    (models / "controlnet").mkdir(parents=True)
    shutil.copy(demo_dir / "loras" / "tiny-sd15-style.safetensors", models / "controlnet" / "lora.safetensors")
    (models / "controlnet" / "pickle.safetensors").write_bytes(b"\x80\x04K\x01." + b"\0" * 20)
    save_file({"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)},
              models / "controlnet" / "ldm.safetensors")
    settings = Settings(models_dirs=(models,), output_dir=tmp_path / "out")
    for name, expected in (("lora.safetensors", "not a ControlNet"), ("pickle.safetensors", "pickle"),
                           ("ldm.safetensors", "original (ldm) layout")):
        wf = {"format": "nodegraph/1", "nodes": {
            "1": {"type": "ControlNetLoader", "inputs": {"control_net_name": name}},
            "2": {"type": "Show", "inputs": {"value": ["1", 0]}}}}
        _, problems = validate(wf, registry, settings)
        [problem] = [p.to_json() for p in problems]
        assert problem["input"] == "control_net_name" and name in problem["message"]
        assert expected in problem["message"]


def test_the_listing_has_folders_and_files_but_not_the_files_inside_folders(demo_dir: Path) -> None:
    from nodes.controlnet import controlnet_names

    names = controlnet_names(Settings(models_dirs=(demo_dir,)))
    assert names == ["tiny-sd15-controlnet", "tiny-sd15-controlnet.safetensors", "tiny-sdxl-controlnet.safetensors"]


# ---------------------------------------------------------------------------------------------- cache, workflows


def test_a_controlnet_over_the_budget_runs_offloaded_and_gives_the_same_latent(
        shared: Executor, registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    from nodegraph.models import ModelManager

    tight = Executor(registry, Settings(models_dirs=(demo_dir,), output_dir=tmp_path),
                     models=ModelManager(device="cpu", ram_budget="1M"))
    torch.testing.assert_close(sampled(tight, graph()), sampled(shared, graph()), atol=1e-4, rtol=0)
    [net] = [e for e in tight.models.resident() if e.key[0] == "controlnet"]
    assert net.offloaded and net.memory == {}  # in files, a block at a time while it runs
    offload_dir = Path(net.value.offload_dir)
    assert any(offload_dir.glob("*.safetensors"))
    tight.models.clear()
    assert not offload_dir.exists()


def test_changing_strength_re_runs_only_the_apply_node_and_the_sampler_onwards(shared: Executor) -> None:
    from nodes.engine.controlnet_model import weights_bytes

    run(shared, graph())
    events = Recorder()
    run(shared, graph(**{"8.strength": 0.6}), events)
    assert sorted(events.ran()) == ["10", "11", "8", "9"]
    loads = [e.message for e in events.of(ev.NodeInfo) if e.kind == "load"]
    assert loads == []  # the ControlNet and the pipeline stayed resident
    # Resident in the model manager, counted by its weights' bytes in the model's dtype.
    [entry] = [r for r in shared.models.resident() if r.name == SD15_CN]
    ref = run(shared, graph()).nodes["7"].outputs["CONTROL_NET"]
    assert entry.on("cpu") == weights_bytes(ref, entry.value.model.dtype) > 0


@pytest.mark.parametrize("path", [API, OURS], ids=["comfyui-api", "nodegraph"])
def test_the_example_workflows_run_from_the_command_line(path: Path, demo_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(path), "--models-dir", str(demo_dir), "--output-dir", str(tmp_path), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["status"] == "ok", result["errors"]
    [file] = result["files"]
    with Image.open(file) as image:
        assert image.size == (64, 64) and np.asarray(image).std() > 1
    if path == OURS:
        assert all("pos" in node.get("ui", {}) for node in load(path)["nodes"].values())
