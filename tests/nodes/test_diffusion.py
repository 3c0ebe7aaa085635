"""The diffusion nodes on the demo models: recipes, sampling, LoRAs, fusing, errors, workflows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from nodegraph import events as ev
from nodegraph.cli import main
from nodegraph.executor import Executor, RunResult
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from tests.conftest import Recorder, workflow

ROOT = Path(__file__).parents[2]


def graph(checkpoint: str = "tiny-sd15", loras: tuple[dict[str, Any], ...] = (), fuse: dict[str, Any] | None = None,
          **sample: Any) -> dict[str, Any]:
    nodes: dict[str, Any] = {"ckpt": {"type": "LoadCheckpoint", "inputs": {"checkpoint": checkpoint, "dtype": "fp32"}}}
    model = ["ckpt", "model"]
    for i, lora in enumerate(loras):
        nodes[f"lora{i}"] = {"type": "LoadLoRA", "inputs": {"model": model, **lora}}
        model = [f"lora{i}", "model"]
    if fuse is not None:
        nodes["fuse"] = {"type": "FuseLoRA", "inputs": {"model": model, **fuse}}
        model = ["fuse", "model"]
    nodes["sample"] = {"type": "Sample", "inputs": {"model": model, "prompt": "a red fox", "seed": 1, "steps": 3,
                                                    "width": 64, "height": 64, **sample}}
    nodes["show"] = {"type": "Show", "inputs": {"value": ["sample", "images"]}}
    return workflow(nodes)


@pytest.fixture(scope="module")
def shared(registry: Registry, demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    """One executor (one resident pipeline) for the module, as a server would keep it."""
    settings = Settings(models_dirs=(demo_dir,), output_dir=tmp_path_factory.mktemp("out"))
    return Executor(registry, settings)


def images(executor: Executor, wf: dict[str, Any], events: Recorder | None = None) -> np.ndarray:
    result = executor.run(wf, events if events is not None else Recorder())
    assert result.status == "ok", result.errors
    pixels: np.ndarray = result.nodes["show"].outputs["value"].pixels
    return pixels


def failure(result: RunResult) -> tuple[str | None, str | None, str]:
    assert result.status == "error", result.status
    [problem] = result.errors
    return problem.node_id, problem.input, problem.code


def differs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


def test_same_seed_same_image_and_seed_matters(shared: Executor) -> None:
    first = images(shared, graph(seed=5))
    shared.cache.clear()
    assert np.array_equal(images(shared, graph(seed=5)), first)
    assert differs(images(shared, graph(seed=6)), first) > 1


def test_batch_and_size(shared: Executor) -> None:
    out = images(shared, graph(batch_size=2, width=64, height=48))
    assert out.shape == (2, 48, 64, 3) and out.dtype == np.uint8
    assert differs(out[0], out[1]) > 1


def test_single_file_and_folder_give_the_same_image(shared: Executor) -> None:
    assert np.array_equal(images(shared, graph("tiny-sd15.safetensors")), images(shared, graph("tiny-sd15")))


def test_sdxl_samples_with_its_lora(shared: Executor) -> None:
    plain = images(shared, graph("tiny-sdxl"))
    styled = images(shared, graph("tiny-sdxl", ({"lora": "tiny-sdxl-style.safetensors"},)))
    assert plain.shape == (1, 64, 64, 3) and differs(plain, styled) > 1


@pytest.mark.parametrize("sampler, scheduler", [("euler_ancestral", "normal"), ("dpmpp_2m", "karras"),
                                                ("ddim", "ddim_uniform"), ("uni_pc", "sgm_uniform")])
def test_sampler_and_scheduler_are_honoured_and_deterministic(shared: Executor, sampler: str, scheduler: str) -> None:
    out = images(shared, graph(sampler_name=sampler, scheduler=scheduler))
    shared.cache.clear()
    assert np.array_equal(images(shared, graph(sampler_name=sampler, scheduler=scheduler)), out)
    assert differs(out, images(shared, graph())) > 0.5  # euler, normal


def test_progress_per_step_and_events(shared: Executor) -> None:
    events = Recorder()
    images(shared, graph(steps=4, seed=77), events)
    assert [(e.step, e.total) for e in events.of(ev.Progress)] == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_cancel_within_steps(shared: Executor) -> None:
    from nodegraph.context import CancelToken

    cancel = CancelToken()
    events = Recorder()

    def sink(event: ev.Event) -> None:
        events(event)
        if isinstance(event, ev.Progress) and event.step == 2:
            cancel.cancel()

    result = shared.run(graph(steps=10, seed=99), sink, cancel)
    assert result.status == "interrupted" and result.nodes["sample"].status == "interrupted"
    assert max(e.step for e in events.of(ev.Progress)) == 2
    assert images(shared, graph(steps=3, seed=99)).shape == (1, 64, 64, 3)  # the pipeline still works


def test_lora_changes_the_image_and_strength_zero_does_not(shared: Executor) -> None:
    base = images(shared, graph())
    styled = images(shared, graph(loras=({"lora": "tiny-sd15-style.safetensors", "strength": 1.0},)))
    off = images(shared, graph(loras=({"lora": "tiny-sd15-style.safetensors", "strength": 0.0},)))
    assert differs(base, styled) > 1
    assert differs(base, off) < 0.5


def test_strength_change_reuses_the_pipeline(shared: Executor) -> None:
    images(shared, graph(loras=({"lora": "tiny-sd15-kohya.safetensors", "strength": 1.0},)))
    events = Recorder()
    images(shared, graph(loras=({"lora": "tiny-sd15-kohya.safetensors", "strength": 0.3},)), events)
    infos = [(e.kind, e.message) for e in events.of(ev.NodeInfo)]
    assert infos == [("reconcile", "model: scales")]
    assert events.ran() == ["lora0", "sample", "show"]


def test_alpha_is_honoured(shared: Executor) -> None:
    # The alpha LoRA holds the style LoRA's matrices with half the alpha: equal to the style LoRA at 0.5.
    half = images(shared, graph(loras=({"lora": "tiny-sd15-style.safetensors", "strength": 0.5},)))
    alpha = images(shared, graph(loras=({"lora": "tiny-sd15-alpha.safetensors", "strength": 1.0},)))
    assert differs(half, alpha) < 0.5


def test_stacked_loras_with_slots_and_text_encoder(shared: Executor) -> None:
    one = images(shared, graph(loras=({"lora": "tiny-sd15-te.safetensors", "text_encoder_strength": 0.0},)))
    te = images(shared, graph(loras=({"lora": "tiny-sd15-te.safetensors", "text_encoder_strength": 1.0},)))
    assert differs(one, te) > 1
    both = images(shared, graph(loras=({"lora": "tiny-sd15-te.safetensors"}, {"lora": "tiny-sd15-subset.safetensors",
                                                                               "strength": 0.7})))
    assert differs(te, both) > 1


def test_block_scales_zero_everywhere_equals_no_lora(shared: Executor) -> None:
    base = images(shared, graph())
    zero = json.dumps({"down": 0, "mid": 0, "up": 0})
    assert differs(base, images(shared, graph(loras=({"lora": "tiny-sd15-style.safetensors",
                                                      "block_scales": zero},)))) < 0.5


def test_fuse_matches_unfused_and_unfusing_restores_the_base(shared: Executor) -> None:
    base = images(shared, graph(seed=3))
    lora = ({"lora": "tiny-sd15-te.safetensors", "strength": 0.8},)
    unfused = images(shared, graph(loras=lora, seed=3))
    fused = images(shared, graph(loras=lora, fuse={"lora_scale": 1.0}, seed=3))
    assert differs(unfused, fused) < 0.5
    shared.cache.clear()
    assert np.array_equal(images(shared, graph(seed=3)), base)


def test_fuse_then_another_lora_on_top(shared: Executor) -> None:
    wf = graph(loras=({"lora": "tiny-sd15-style.safetensors", "slot": "a"},), fuse={"slots": "a"})
    wf["nodes"]["more"] = {"type": "LoadLoRA",
                           "inputs": {"model": ["fuse", "model"], "lora": "tiny-sd15-kohya.safetensors"}}
    wf["nodes"]["sample"]["inputs"]["model"] = ["more", "model"]
    assert images(shared, wf).shape == (1, 64, 64, 3)


@pytest.mark.parametrize("change, where", [
    ({"lora": "missing.safetensors"}, ("lora0", "lora", "not_a_choice")),
    ({"lora": "tiny-sd15-style.safetensors", "slot": "no spaces"}, ("lora0", "slot", "invalid_value")),
    ({"lora": "tiny-sd15-style.safetensors", "block_scales": '{"left": 1}'},
     ("lora0", "block_scales", "invalid_value")),
    ({"lora": "tiny-sd15-style.safetensors", "block_scales": "{"}, ("lora0", "block_scales", "invalid_value")),
])
def test_bad_lora_inputs_are_validation_errors(shared: Executor, change: dict[str, Any], where: Any) -> None:
    result = shared.run(graph(loras=(change,)))
    assert result.status == "invalid"
    assert [(p.node_id, p.input, p.code) for p in result.errors] == [where]


def test_taken_slot_and_unknown_fuse_slot_are_node_errors(shared: Executor) -> None:
    lora = {"lora": "tiny-sd15-style.safetensors", "slot": "s"}
    assert failure(shared.run(graph(loras=(lora, lora)))) == ("lora1", "slot", "slot_taken")
    assert failure(shared.run(graph(loras=(lora,), fuse={"slots": "t"}))) == ("fuse", "slots", "unknown_slot")
    assert failure(shared.run(graph(fuse={}))) == ("fuse", "model", "nothing_to_fuse")


@pytest.fixture
def odd_models(demo_dir: Path, tmp_path: Path) -> Settings:
    """A models folder with files that are not what their names say."""
    for kind in ("checkpoints", "loras"):
        (tmp_path / kind).mkdir()
    (tmp_path / "loras" / "checkpoint.safetensors").symlink_to(demo_dir / "checkpoints" / "tiny-sd15.safetensors")
    (tmp_path / "loras" / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "loras" / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 32)
    (tmp_path / "checkpoints" / "pickle.safetensors").write_bytes(b"PK\x03\x04" + b"\x00" * 32)
    shutil.copy(demo_dir / "loras" / "tiny-sdxl-style.safetensors", tmp_path / "loras" / "sdxl-only.safetensors")
    return Settings(models_dirs=(demo_dir, tmp_path), output_dir=tmp_path / "out")


@pytest.mark.parametrize("lora", ["checkpoint.safetensors", "corrupt.safetensors", "pickle.safetensors"])
def test_files_that_are_not_loras_are_errors_naming_them(registry: Registry, odd_models: Settings,
                                                          lora: str) -> None:
    """At validation where the fit check reads the file (a checkpoint), else when LoadLoRA runs."""
    result = Executor(registry, odd_models).run(graph(loras=({"lora": lora},)))
    assert result.status in ("invalid", "error")
    [problem] = result.errors
    assert (problem.node_id, problem.input, problem.code) == ("lora0", "lora", "bad_lora")
    assert lora.split(".")[0] in problem.message


def test_pickled_checkpoint_is_refused(registry: Registry, odd_models: Settings) -> None:
    result = Executor(registry, odd_models).run(graph("pickle.safetensors"))
    assert failure(result) == ("ckpt", "checkpoint", "bad_checkpoint")
    assert "pickle" in result.errors[0].message


def test_lora_for_another_model_is_a_validation_error_naming_file_and_layer(registry: Registry,
                                                                            odd_models: Settings) -> None:
    executor = Executor(registry, odd_models)
    result = executor.run(graph(loras=({"lora": "tiny-sd15-style.safetensors"}, {"lora": "sdxl-only.safetensors"})))
    assert result.status == "invalid"
    [problem] = result.errors
    assert (problem.node_id, problem.input, problem.code) == ("lora1", "lora", "wrong_model")
    assert "sdxl-only.safetensors" in problem.message and "unet.down_blocks.1.attentions.0" in problem.message
    assert "96→64" in problem.message


def test_validate_on_the_command_line_names_a_lora_for_another_model(demo_dir: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(graph("tiny-sdxl", loras=({"lora": "tiny-sd15-kohya.safetensors"},))))
    code = main(["validate", str(path), "--models-dir", str(demo_dir), "--json"])
    [problem] = json.loads(capsys.readouterr().out)["errors"]
    assert code == 1 and (problem["node_id"], problem["code"]) == ("lora0", "wrong_model")
    assert "tiny-sd15-kohya.safetensors" in problem["message"] and "(sdxl)" in problem["message"]


def test_lora_for_another_model_fails_on_load_lora_when_validation_cannot_see_the_checkpoint(
        registry: Registry, odd_models: Settings) -> None:
    executor = Executor(registry, odd_models)
    good = images(executor, graph(loras=({"lora": "tiny-sd15-style.safetensors"},)))
    wf = graph(loras=({"lora": "tiny-sd15-style.safetensors"}, {"lora": "sdxl-only.safetensors"}))
    wf["nodes"]["name"] = {"type": "String", "inputs": {"value": "tiny-sd15"}}
    wf["nodes"]["ckpt"]["inputs"]["checkpoint"] = ["name", 0]  # known only when it runs
    events = Recorder()
    result = executor.run(wf, events)
    assert failure(result) == ("lora1", "lora", "wrong_model")
    assert "sample" not in events.ran()  # found before any pipeline was touched
    executor.cache.clear()
    assert np.array_equal(images(executor, graph(loras=({"lora": "tiny-sd15-style.safetensors"},))), good)


def test_block_scales_for_blocks_the_model_lacks_are_validation_errors(shared: Executor) -> None:
    for scales, words in (('{"down": {"block_0": 1}}', "no attention layers"),
                          ('{"up": {"block_0": [1, 0]}}', "3 attention layers")):
        result = shared.run(graph(loras=({"lora": "tiny-sd15-style.safetensors", "block_scales": scales},)))
        assert result.status == "invalid"
        [problem] = result.errors
        assert (problem.node_id, problem.input, problem.code) == ("lora0", "block_scales", "invalid_value")
        assert words in problem.message


@pytest.mark.parametrize("name", ["lora.json", "stacked.json", "fused.json", "sdxl.json", "hotswap.json",
                                  "flux_lora.json", "flux_schedule.json", "sd3_lora.json"])
def test_example_workflows_run_headless(name: str, demo_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(ROOT / "workflows" / name), "--models-dir", str(demo_dir), "--output-dir",
                 str(tmp_path), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["status"] == "ok", result["errors"]
    assert result["files"]
    for path in result["files"]:
        with Image.open(path) as image:
            assert image.size == (64, 64)
            assert json.loads(image.text["workflow"])["nodes"]


def test_a_run_says_what_takes_time_as_it_happens(demo_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A model's first load is announced before it starts, on stderr: a line each, or JSON lines with --json."""
    args = ["run", str(ROOT / "workflows" / "lora.json"), "--models-dir", str(demo_dir), "--output-dir",
            str(tmp_path)]
    assert main([*args, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["status"] == "ok"
    news = [json.loads(line) for line in err.splitlines()]
    kinds = [event["kind"] for event in news if event["type"] == "node_info"]
    assert kinds.index("loading") < kinds.index("load")
    assert any(event["type"] == "progress" for event in news)
    assert main(args) == 0
    err = capsys.readouterr().err  # not a terminal: no progress bar, the news lines still
    assert "loading tiny-sd15" in err and "\r" not in err
