"""An existing ComfyUI install's model folders: extra_model_paths.yaml, `clip/` and `unet/`, `.sft` files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nodegraph.cli import main
from nodegraph.comfy_folders import read_extra_model_paths
from nodegraph.model_listing import forget
from nodegraph.settings import ConfigError, Settings

YAML = """\
comfyui:
  base_path: comfy/
  is_default: false
  checkpoints: models/checkpoints
  clip: models/clip
  unet: models/unet
  loras: |
    models/loras
    ../more_loras

a111:
  base_path: {a111}
  embeddings: embeddings
  controlnet: models/ControlNet
"""


@pytest.fixture
def install(tmp_path: Path) -> Path:
    """A ComfyUI-style tree beside an extra_model_paths.yaml; every file empty (listing reads no bytes)."""
    forget()
    for name in ("comfy/models/checkpoints/base.safetensors", "comfy/models/clip/t5xxl.safetensors",
                 "comfy/models/unet/flux1-dev.sft", "comfy/models/loras/ink.safetensors",
                 "comfy/models/loras/old.ckpt", "comfy/models/loras/old.pt", "more_loras/style/pen.sft",
                 "a1111/embeddings/bad.safetensors", "models/text_encoders/clip_l.safetensors",
                 "models/clip/clip_g.safetensors", "models/unet/sd3.safetensors"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    (tmp_path / "extra_model_paths.yaml").write_text(YAML.format(a111=tmp_path / "a1111"))
    return tmp_path


def choices(catalog: Any, node_type: str, input_name: str) -> list[str]:
    nodes = catalog["nodes"] if isinstance(catalog, dict) and "nodes" in catalog else catalog
    entries = nodes if isinstance(nodes, list) else list(nodes.values())
    [node] = [n for n in entries if n["type"] == node_type]
    [spec] = [i for i in node["inputs"] if i["name"] == input_name]
    return list(spec["choices"])


def test_the_yaml_gives_folders_by_kind_with_comfyuis_names(install: Path) -> None:
    found = read_extra_model_paths(install / "extra_model_paths.yaml")
    comfy = install / "comfy"
    assert [(kind, path.resolve()) for kind, path, _ in found] == [
        ("checkpoints", (comfy / "models/checkpoints").resolve()),
        ("text_encoders", (comfy / "models/clip").resolve()),
        ("diffusion_models", (comfy / "models/unet").resolve()),
        ("loras", (comfy / "models/loras").resolve()),
        ("loras", (install / "more_loras").resolve()),
        ("embeddings", (install / "a1111/embeddings").resolve()),
        ("controlnet", (install / "a1111/models/ControlNet").resolve()),
    ]


def test_each_model_is_listed_under_its_loader(install: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(install)  # ./extra_model_paths.yaml is read without being named
    assert main(["nodes", "--json", "--models-dir", str(install / "models")]) == 0
    catalog = json.loads(capsys.readouterr().out)
    assert choices(catalog, "CheckpointLoaderSimple", "ckpt_name") == ["base.safetensors"]
    assert choices(catalog, "UNETLoader", "unet_name") == ["flux1-dev.sft", "sd3.safetensors"]
    assert choices(catalog, "DualCLIPLoader", "clip_name1") == ["clip_g.safetensors", "clip_l.safetensors",
                                                                "t5xxl.safetensors"]
    assert choices(catalog, "LoraLoader", "lora_name") == ["ink.safetensors", "style/pen.sft"]  # no pickles


def test_a_named_file_is_read_and_a_pickle_is_refused_by_name(install: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = Settings.from_args(extra_model_paths=[str(install / "extra_model_paths.yaml")])
    assert settings.resolve_model("diffusion_models", "flux1-dev.sft").name == "flux1-dev.sft"
    assert settings.model_files("text_encoders") == ["t5xxl.safetensors"]
    flow = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "base.safetensors"}},
            "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "old.ckpt",
                                                         "strength_model": 1.0, "strength_clip": 1.0}},
            "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    (elsewhere / "flow.json").write_text(json.dumps(flow))
    yaml = str(install / "extra_model_paths.yaml")
    assert main(["validate", "flow.json", "--json", "--extra-model-paths", yaml]) == 1
    errors = json.loads(capsys.readouterr().out)["errors"]
    assert [(e["node_id"], e["input"], e["code"]) for e in errors] == [("2", "lora_name", "unsafe_format")]
    assert "pickle" in errors[0]["message"]


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "named sections"),
    ("comfyui: [1]\n", "must hold 'base_path'"),
    ("comfyui:\n  loras: 3\n", "must be a path"),
    ("comfyui: {\n", "not YAML"),
])
def test_a_bad_yaml_is_a_config_error(tmp_path: Path, text: str, message: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        Settings.from_args(extra_model_paths=[str(tmp_path / "bad.yaml")])
    assert main(["nodes", "--extra-model-paths", str(tmp_path / "bad.yaml")]) == 1
    assert message in capsys.readouterr().err
