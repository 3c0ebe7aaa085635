"""MergeLoRA and SaveLoRA: merges equal PEFT's add_weighted_adapter on the same adapters, saved LoRAs load back
to the same layers and image, and files are written atomically, never over another."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from nodegraph.cli import main
from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodes.engine import lora_merge
from nodes.engine.checkpoints import load_pipeline
from tests.conftest import Recorder, workflow
from tests.nodes import lora_fixtures
from tests.nodes.test_lora_formats import deltas, loaded

PAIRS = {"same rank": ("tiny-sd15-style", "tiny-sd15-subset"), "ranks differ": ("tiny-sd15-style", "tiny-sd15-rank8")}


@pytest.fixture(scope="module")
def base(demo_dir: Path) -> Any:
    return load_pipeline(demo_dir / "checkpoints" / "tiny-sd15")


def peft_merge(base: Any, demo_dir: Path, names: tuple[str, ...], weights: list[float], method: str,
               density: float, rank: int) -> dict[str, torch.Tensor]:
    """The reference: PEFT's add_weighted_adapter on a PEFT model of the UNet with each file as an adapter."""
    model: Any = None
    for index, name in enumerate(names):
        tensors, metadata = lora_fixtures.read(demo_dir / "loras" / f"{name}.safetensors")
        meta = json.loads(metadata["lora_adapter_metadata"])
        config = LoraConfig(r=meta["unet.r"], lora_alpha=meta["unet.lora_alpha"],
                            target_modules=meta["unet.target_modules"])
        if model is None:
            model = get_peft_model(copy.deepcopy(base.unet), config, adapter_name=f"a{index}")
        else:
            model.add_adapter(f"a{index}", config)
        state = {"base_model.model." + k.removeprefix("unet."): v for k, v in tensors.items()}
        set_peft_model_state_dict(model, state, adapter_name=f"a{index}")
    model.base_model.add_weighted_adapter([f"a{i}" for i in range(len(names))], weights, "merged",
                                          combination_type=method, density=density, svd_rank=rank or None)
    return {("unet", name): layer.get_delta_weight("merged").detach()
            for name, layer in model.base_model.model.named_modules() if isinstance(layer, LoraLayer)}


@pytest.mark.parametrize("pair, method, peft_method, rank", [
    ("same rank", "linear", "linear", 0),
    ("same rank", "cat", "cat", 0),
    ("same rank", "ties", "ties", 0),
    ("same rank", "dare_linear", "dare_linear", 0),  # density 1: nothing dropped, so no randomness
    ("ranks differ", "cat", "cat", 0),
    ("ranks differ", "linear", "svd", 0),  # PEFT refuses linear on unequal ranks: SVD to the largest rank
    ("ranks differ", "ties", "ties_svd", 6),
])
def test_merge_equals_peft_add_weighted_adapter(base: Any, demo_dir: Path, tmp_path: Path, pair: str, method: str,
                                               peft_method: str, rank: int) -> None:
    names, weights, density = PAIRS[pair], [0.8, -0.6], 1.0 if method.startswith("dare") else 0.5
    paths = [str(demo_dir / "loras" / f"{n}.safetensors") for n in names]
    ckpt = str(demo_dir / "checkpoints" / "tiny-sd15")
    layers = lora_merge.merge(lora_merge.adapter_layers(ckpt, "sd15", paths), weights, method, density, rank, 0)
    path = tmp_path / "merged.safetensors"
    lora_merge.write_lora(path, *lora_merge.layers_to_state(layers))
    got = {key: value for key, value in deltas(loaded(base, demo_dir, path).pipe).items()}
    want = peft_merge(base, demo_dir, names, weights, peft_method, density, rank)
    assert set(got) == set(want)
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta, atol=1e-5, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")


def test_dare_drops_are_seeded(demo_dir: Path) -> None:
    paths = [str(demo_dir / "loras" / f"{n}.safetensors") for n in PAIRS["same rank"]]
    ckpt = str(demo_dir / "checkpoints" / "tiny-sd15")

    def run(seed: int) -> torch.Tensor:
        layers = lora_merge.merge(lora_merge.adapter_layers(ckpt, "sd15", paths), [1.0, 1.0], "dare_ties", 0.3, 0, seed)
        return torch.cat([a.flatten() for a, _ in layers["unet"].values()])

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


@pytest.fixture
def executor(registry: Registry, demo_dir: Path, tmp_path: Path) -> Executor:
    (tmp_path / "models" / "loras").mkdir(parents=True)
    return Executor(registry, Settings(models_dirs=(tmp_path / "models", demo_dir), output_dir=tmp_path / "out"))


def graph(merge: dict[str, Any] | None, save: dict[str, Any] | None = None, extra: str = "") -> dict[str, Any]:
    nodes: dict[str, Any] = {
        "ckpt": {"type": "LoadCheckpoint", "inputs": {"checkpoint": "tiny-sd15", "dtype": "fp32"}},
        "a": {"type": "LoadLoRA", "inputs": {"model": ["ckpt", 0], "lora": "tiny-sd15-style.safetensors",
                                              "slot": "a", "strength": 0.7}},
        "b": {"type": "LoadLoRA", "inputs": {"model": ["a", 0], "lora": "tiny-sd15-rank8.safetensors",
                                              "slot": "b", "strength": -0.5}}}
    model = ["b", 0]
    if merge is not None:
        nodes["merge"] = {"type": "MergeLoRA", "inputs": {"model": model, **merge}}
        model = ["merge", 0]
    if save is not None:
        nodes["save"] = {"type": "SaveLoRA", "inputs": {"model": model, **save}}
    if extra:
        nodes["c"] = {"type": "LoadLoRA", "inputs": {"model": ["ckpt", 0], "lora": extra, "slot": "c"}}
        model = ["c", 0]
    nodes["sample"] = {"type": "Sample", "inputs": {"model": model, "prompt": "a castle", "seed": 4, "steps": 3,
                                                    "width": 64, "height": 64, "sampler_name": "euler"}}
    nodes["show"] = {"type": "Show", "inputs": {"value": ["sample", 0]}}
    return workflow(nodes)


def pixels(executor: Executor, wf: dict[str, Any]) -> np.ndarray:
    result = executor.run(wf, Recorder())
    assert result.status == "ok", result.errors
    out: np.ndarray = result.nodes["show"].outputs["value"].pixels.astype(np.int16)
    return out


def test_a_cat_merge_at_the_slots_strengths_equals_the_stack_it_replaces(executor: Executor) -> None:
    """cat keeps every rank, so the merge is exactly Σ strength·ΔW: the image of the two slots stacked."""
    merged = pixels(executor, graph({"method": "cat", "slot": "ab"}))
    stacked = pixels(executor, graph(None))
    assert np.abs(merged - stacked).max() <= 1
    result = executor.run(graph({"method": "cat", "slot": "ab"}))
    assert list(result.nodes["merge"].outputs["model"].live()) == ["ab"]


def test_saved_lora_loads_back_to_the_same_image(executor: Executor, tmp_path: Path) -> None:
    result = executor.run(graph({"method": "ties", "density": 0.7, "slot": "ab"},
                                {"slot": "ab", "filename_prefix": "mix"}))
    assert result.status == "ok", result.errors
    saved = tmp_path / "models" / "loras" / "mix_00001_.safetensors"
    assert result.nodes["save"].outputs == {"path": str(saved), "name": "mix_00001_.safetensors"} and saved.exists()
    assert [p.name for p in saved.parent.iterdir()] == ["mix_00001_.safetensors"]  # no temp file left
    merged = pixels(executor, graph({"method": "ties", "density": 0.7, "slot": "ab"}))
    assert np.array_equal(pixels(executor, graph(None, extra="mix_00001_.safetensors")), merged)


def test_a_later_node_loads_the_saved_lora_by_its_name_output(executor: Executor) -> None:
    wf = graph(None, {"slot": "a", "filename_prefix": "linked"})
    wf["nodes"]["c"] = {"type": "LoadLoRA", "inputs": {"model": ["ckpt", 0], "lora": ["save", "name"], "slot": "c",
                                                       "strength": 0.7}}
    wf["nodes"]["sample"]["inputs"]["model"] = ["c", 0]
    result = executor.run(wf)
    assert result.status == "ok", result.errors
    assert list(result.nodes["c"].outputs["model"].live()) == ["c"]
    assert result.nodes["c"].outputs["model"].live()["c"].path.endswith("linked_00001_.safetensors")


def test_saved_loras_are_numbered_and_never_overwrite(executor: Executor, tmp_path: Path) -> None:
    loras = tmp_path / "models" / "loras"
    (loras / "sub").mkdir()
    (loras / "sub" / "mine_00001_.safetensors").write_bytes(b"keep me")
    for prefix in ("sub/mine", "loras/sub/mine"):  # ComfyUI's LoraSave prefixes start with loras/: the same folder
        result = executor.run(graph(None, {"slot": "a", "filename_prefix": prefix}))
        assert result.status == "ok", result.errors
    assert sorted(p.name for p in (loras / "sub").iterdir()) == [
        "mine_00001_.safetensors", "mine_00002_.safetensors", "mine_00003_.safetensors"]
    assert (loras / "sub" / "mine_00001_.safetensors").read_bytes() == b"keep me"
    assert result.nodes["save"].outputs["name"] == "sub/mine_00003_.safetensors"


def test_an_identical_run_reuses_the_saved_file_until_it_is_deleted(executor: Executor, tmp_path: Path) -> None:
    wf = graph(None, {"slot": "a", "filename_prefix": "again"})
    saved = tmp_path / "models" / "loras" / "again_00001_.safetensors"
    assert executor.run(wf).nodes["save"].status == "ran" and saved.exists()
    assert executor.run(wf).nodes["save"].status == "cached" and len(list(saved.parent.iterdir())) == 1
    saved.unlink()
    result = executor.run(wf)  # the cached output names a file that is gone: saved again
    assert result.nodes["save"].status == "ran" and saved.exists()


@pytest.mark.parametrize("node, save", [("SaveLoRA", {"slot": "a", "filename": "mix"}),
                                        ("SaveCheckpoint", {"filename": "mine", "format": "single_file"})])
def test_the_old_filename_input_says_what_to_write_instead(executor: Executor, node: str, save: dict[str, Any]) -> None:
    wf = graph(None, save) if node == "SaveLoRA" else checkpoint_graph("tiny-sd15", True, save)
    result = executor.run(wf)
    assert result.status == "invalid" and not result.nodes
    [error] = result.errors
    assert (error.node_id, error.input, error.code) == ("save", "filename", "unknown_input")
    assert "rename 'filename' to 'filename_prefix'" in error.message and "_00001_.safetensors" in error.message


@pytest.mark.parametrize("prefix", ["../out", "/abs/x", "sub/", "a\x00b"])
def test_a_prefix_outside_the_folder_is_refused_at_validation(executor: Executor, prefix: str) -> None:
    for wf in (graph(None, {"slot": "a", "filename_prefix": prefix}),
               checkpoint_graph("tiny-sd15", True, {"filename_prefix": prefix})):
        result = executor.run(wf)
        assert result.status == "invalid" and [(e.node_id, e.input, e.code) for e in result.errors] == [
            ("save", "filename_prefix", "invalid_value")]


def test_write_lora_never_replaces_a_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        lora_merge.write_lora(path, {"a": torch.zeros(1)}, {})
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_merge_errors_name_the_input(executor: Executor) -> None:
    result = executor.run(graph({"slots": "a, nope"}))
    assert [(e.node_id, e.input, e.code) for e in result.errors] == [("merge", "slots", "unknown_slot")]
    result = executor.run(graph({"weights": "1, x"}))
    assert result.status == "invalid" and [(e.node_id, e.input) for e in result.errors] == [("merge", "weights")]


@pytest.mark.parametrize("name, written", [
    ("merge.json", "loras/style-detail-mix_0000{}_.safetensors"),
    ("save_checkpoint.json", "checkpoints/tiny-sd15-styled_0000{}_.safetensors")])
def test_workflows_run_headless_and_a_second_run_writes_the_next_file(
        demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, written: str) -> None:
    args = ["run", str(Path(__file__).parents[2] / "workflows" / name), "--models-dir",
            str(tmp_path / "models"), "--models-dir", str(demo_dir), "--output-dir", str(tmp_path / "out"), "--json"]
    for run in (1, 2):
        assert main(args) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["status"] == "ok" and result["files"]
        assert (tmp_path / "models" / written.format(run)).exists()


def checkpoint_graph(checkpoint: str, fused: bool, save: dict[str, Any] | None = None) -> dict[str, Any]:
    nodes: dict[str, Any] = {"ckpt": {"type": "LoadCheckpoint", "inputs": {"checkpoint": checkpoint, "dtype": "fp32"}}}
    model = ["ckpt", 0]
    if fused:
        nodes["lora"] = {"type": "LoadLoRA", "inputs": {"model": model, "lora": "tiny-sd15-te.safetensors",
                                                         "strength": 0.8, "text_encoder_strength": 0.5}}
        nodes["fuse"] = {"type": "FuseLoRA", "inputs": {"model": ["lora", 0], "lora_scale": 0.9}}
        model = ["fuse", 0]
    if save is not None:
        nodes["save"] = {"type": "SaveCheckpoint", "inputs": {"model": model, **save}}
    nodes["sample"] = {"type": "Sample", "inputs": {"model": model, "prompt": "a castle", "seed": 4, "steps": 3,
                                                    "width": 64, "height": 64, "sampler_name": "euler"}}
    nodes["show"] = {"type": "Show", "inputs": {"value": ["sample", 0]}}
    return workflow(nodes)


@pytest.mark.parametrize("layout, name", [("single_file", "fused_00001_.safetensors"), ("diffusers", "fused_00001_")])
def test_saved_checkpoint_loads_back_to_the_fused_image(executor: Executor, tmp_path: Path, layout: str,
                                                        name: str) -> None:
    save = {"filename_prefix": "checkpoints/fused", "format": layout, "dtype": "fp32"}
    result = executor.run(checkpoint_graph("tiny-sd15", True, save))
    assert result.status == "ok", result.errors
    assert result.nodes["save"].outputs["name"] == name and (tmp_path / "models" / "checkpoints" / name).exists()
    assert not [p for p in (tmp_path / "models" / "checkpoints").iterdir() if p.name.startswith(".")]
    fused = result.nodes["show"].outputs["value"].pixels.astype(np.int16)
    reloaded = pixels(executor, checkpoint_graph(name, False))
    assert np.abs(reloaded - fused).max() <= 1
    assert np.abs(reloaded - pixels(executor, checkpoint_graph("tiny-sd15", False))).mean() > 1  # the LoRA is in it


def test_save_checkpoint_refuses_live_loras(executor: Executor) -> None:
    wf = checkpoint_graph("tiny-sd15", True, {"filename_prefix": "x", "format": "single_file"})
    wf["nodes"]["save"]["inputs"]["model"] = ["lora", 0]  # not fused
    result = executor.run(wf)
    assert [(e.node_id, e.input, e.code) for e in result.errors] == [("save", "model", "not_fused")]


def test_text_encoder_layers_merge_too(base: Any, demo_dir: Path, tmp_path: Path) -> None:
    source = demo_dir / "loras" / "tiny-sd15-te.safetensors"
    ckpt = str(demo_dir / "checkpoints" / "tiny-sd15")
    layers = lora_merge.merge(lora_merge.adapter_layers(ckpt, "sd15", [str(source), str(source)]), [0.5, 0.25],
                              "cat", 1.0, 0, 0)
    path = tmp_path / "te.safetensors"
    lora_merge.write_lora(path, *lora_merge.layers_to_state(layers))
    got, want = deltas(loaded(base, demo_dir, path).pipe), deltas(loaded(base, demo_dir, source).pipe)
    assert set(got) == set(want) and any(component == "text_encoder" for component, _ in want)
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta * 0.75, atol=1e-6, rtol=1e-5)
