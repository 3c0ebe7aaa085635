"""The input folder: where it is (flag, config file, default), what it lists, names confined to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodegraph.cli import main
from nodegraph.settings import ConfigError, Settings, read_config


def test_the_input_folder_from_the_flag_the_config_file_or_the_default(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NODEGRAPH_CONFIG", raising=False)
    assert Settings.from_args().input_dir == Path("input")
    config = tmp_path / "conf" / "nodegraph.json"
    config.parent.mkdir()
    config.write_text('{"input_dir": "pictures", "output_dir": "out"}')
    monkeypatch.setenv("NODEGRAPH_CONFIG", str(config))
    assert Settings.from_args().input_dir == tmp_path / "conf" / "pictures"
    assert Settings.from_args(input_dir="flag").input_dir == Path("flag")
    for bad in ('{"input_dir": 3}', '["not", "an", "object"]'):
        config.write_text(bad)
        with pytest.raises(ConfigError, match="config file"):
            read_config()


def test_input_names_are_confined_to_the_folder(tmp_path: Path) -> None:
    settings = Settings(input_dir=tmp_path / "input")
    (tmp_path / "input" / "sub").mkdir(parents=True)
    (tmp_path / "input" / "sub" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    assert settings.resolve_input("sub/a.png") == tmp_path / "input" / "sub" / "a.png"
    for name in ("../secret.png", str(tmp_path / "secret.png"), "", "sub/../../secret.png", "sub", "missing.png"):
        with pytest.raises(FileNotFoundError):
            settings.resolve_input(name)
    assert Settings(input_dir=tmp_path / "nowhere").input_files() == []


def test_validate_and_run_read_images_from_input_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 4)).save(tmp_path / "in" / "x.png")
    path = tmp_path / "wf.json"
    path.write_text(json.dumps({"format": "nodegraph/1", "ui": {}, "nodes": {
        "1": {"type": "LoadImage", "inputs": {"image": "x.png"}},
        "2": {"type": "Show", "inputs": {"value": ["1", "IMAGE"]}}}}))
    assert main(["validate", str(path), "--input-dir", str(tmp_path / "in")]) == 0
    assert main(["validate", str(path), "--input-dir", str(tmp_path / "elsewhere"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out.split("valid\n")[-1])["errors"][0]["code"] == "not_a_choice"
    assert main(["run", str(path), "--input-dir", str(tmp_path / "in"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nodes"]["1"]["outputs"]["IMAGE"]["summary"] == "1 image(s), 8×4"
