"""Errors before anything runs, through the command line, on the demo models: sizes too large for the
budget, every problem of a node at once, the checkpoint choices and where models were looked for."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from nodegraph.cli import main
from nodegraph.executor import Executor
from nodegraph.models import ModelManager
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from tests.nodes.test_diffusion import graph

GiB = 2**30


@pytest.fixture(autouse=True)
def machine_with_16_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every device here has 16 GiB, so the limits do not depend on the machine the tests run on."""
    monkeypatch.setattr("nodegraph.models.device_memory", lambda device: 16 * GiB)


def cli(capsys: pytest.CaptureFixture[str], tmp_path: Path, wf: dict[str, Any], *args: str) -> tuple[int, Any]:
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    code = main([args[0], str(path), "--json", *args[1:]])
    return code, json.loads(capsys.readouterr().out)


def problems(result: Any) -> set[tuple[str, str, str]]:
    return {(e["node_id"], e["input"], e["code"]) for e in result["errors"]}


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_size_too_large_for_the_budget_is_refused_before_running(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_dir: Path, command: str) -> None:
    output = ("--output-dir", str(tmp_path)) if command == "run" else ()
    code, result = cli(capsys, tmp_path, graph(width=8192, height=8192), command, "--models-dir", str(demo_dir),
                       "--device", "cpu", *output)
    assert code == 1 and problems(result) == {("sample", "width", "too_large")}
    message = result["errors"][0]["message"]
    assert message.startswith("1× 8192×8192 needs about 61.9 GiB of memory for sampling on cpu, more than the "
                              "RAM (16.0 GiB): about 4160×4160 fits at this batch size")
    if command == "run":
        assert result["status"] == "invalid" and result["nodes"] == {}


def test_a_batch_too_large_names_batch_size(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                            demo_dir: Path) -> None:
    code, result = cli(capsys, tmp_path, graph(width=1024, height=1024, batch_size=64), "validate",
                       "--models-dir", str(demo_dir), "--device", "cpu")
    assert code == 1 and problems(result) == {("sample", "batch_size", "too_large")}


def test_a_size_that_fits_runs_whatever_the_model_budget(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     demo_dir: Path) -> None:
    code, result = cli(capsys, tmp_path, graph(steps=1, width=256, height=256), "run", "--models-dir",
                       str(demo_dir), "--device", "cpu", "--ram-budget", "64M", "--output-dir", str(tmp_path))
    assert code == 0 and result["status"] == "ok"


def test_a_linked_size_is_refused_at_run_time_before_loading(registry: Registry, demo_settings: Settings) -> None:
    wf = graph(height=8192)
    wf["nodes"]["size"] = {"type": "Int", "inputs": {"value": 8192}}
    wf["nodes"]["sample"]["inputs"]["width"] = ["size", "value"]
    executor = Executor(registry, demo_settings, models=ModelManager(device="cpu"))
    result = executor.run(wf)
    assert result.status == "error"
    assert [(e.node_id, e.input, e.code) for e in result.errors] == [("sample", "width", "too_large")]
    assert "more than what is left of the RAM (16.0 GiB) after 7.1 MiB of model weights" in result.errors[0].message
    assert executor.models.resident() == []  # refused before the model loaded


def test_validate_reports_every_problem_of_a_node_at_once(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                          demo_dir: Path) -> None:
    code, result = cli(capsys, tmp_path, graph(width=65, steps=0, height=12), "validate",
                       "--models-dir", str(demo_dir))
    assert code == 1
    assert problems(result) == {("sample", "width", "invalid_value"), ("sample", "steps", "out_of_range"),
                                ("sample", "height", "invalid_value")}
    code, result = cli(capsys, tmp_path, graph(width=8192, height=8192, steps=0), "validate",
                       "--models-dir", str(demo_dir), "--device", "cpu")
    assert problems(result) == {("sample", "steps", "out_of_range"), ("sample", "width", "too_large")}


def test_checkpoint_choices_are_loadable_models_listed_afresh(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                              demo_dir: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(demo_dir / "checkpoints", root / "checkpoints")

    def choices() -> list[str]:
        assert main(["nodes", "--json", "--models-dir", str(root)]) == 0
        node = json.loads(capsys.readouterr().out)["nodes"]["LoadCheckpoint"]
        return next(i["choices"] for i in node["inputs"] if i["name"] == "checkpoint")

    demo = ["tiny-flux", "tiny-sd15", "tiny-sd15.safetensors", "tiny-sd3", "tiny-sdxl"]
    assert choices() == demo  # not tiny-sd15/unet/… parts
    shutil.copy(root / "checkpoints" / "tiny-sd15.safetensors", root / "checkpoints" / "copy.safetensors")
    shutil.copytree(root / "checkpoints" / "tiny-sdxl", root / "checkpoints" / "more" / "xl")
    assert choices() == ["copy.safetensors", "more/xl", *demo]


def test_a_missing_model_says_which_folders_were_searched(capsys: pytest.CaptureFixture[str],
                                                          tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    code, result = cli(capsys, tmp_path, graph(), "validate", "--models-dir", str(first), "--models-dir", str(second))
    assert code == 1
    [error] = [e for e in result["errors"] if e["input"] == "checkpoint"]
    assert error["code"] == "not_a_choice" and "(none available)" in error["message"]
    assert f"looked in {first / 'checkpoints'}, {second / 'checkpoints'}" in error["message"]


def test_a_misspelt_lora_lists_the_loras_for_the_models_family_first(registry: Registry, demo_dir: Path) -> None:
    from nodegraph.validate import validate

    _, found = validate(graph(loras=({"lora": "tiny-sd15-styel.safetensors"},)), registry,
                        Settings(models_dirs=(demo_dir,)))
    [problem] = found
    assert (problem.node_id, problem.input, problem.code) == ("lora0", "lora", "not_a_choice")
    message = problem.message
    assert "did you mean 'tiny-sd15-style.safetensors'?" in message and "this sd15 model: " in message
    sd15 = [message.index(f"'{p.name}'") for p in (demo_dir / "loras").glob("tiny-sd15-*.safetensors")]
    others = [message.find(f"'{p.name}'") for p in (demo_dir / "loras").glob("tiny-flux-*.safetensors")]
    assert sd15 and max(sd15) < min(i for i in others if i >= 0)
