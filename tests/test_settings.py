"""Model folders (nodegraph/settings.py): which files are models, and the choices that name them."""

from __future__ import annotations

from pathlib import Path

from nodegraph.settings import ModelChoices, Settings


def test_a_diffusers_folder_is_one_model_and_linked_folders_are_followed_once(tmp_path: Path) -> None:
    base = tmp_path / "models" / "checkpoints"
    for part in ("unet", "vae", "text_encoder"):
        (base / "sd" / part).mkdir(parents=True)
        (base / "sd" / part / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (base / "sd" / "model_index.json").write_text("{}")
    (base / "single.safetensors").write_bytes(b"")
    (base / ".hidden.safetensors").write_bytes(b"")
    (base / "notes.txt").write_text("")
    elsewhere = tmp_path / "disk" / "xl"
    elsewhere.mkdir(parents=True)
    (elsewhere / "model_index.json").write_text("{}")
    (elsewhere / "unet.safetensors").write_bytes(b"")
    (base / "linked").symlink_to(elsewhere, target_is_directory=True)
    (base / "loop").mkdir()
    (base / "loop" / "again").symlink_to(base / "loop", target_is_directory=True)  # a cycle: walked once
    settings = Settings(models_dirs=(tmp_path / "models",))
    assert settings.model_files("checkpoints", folders=True) == ["linked", "sd", "single.safetensors"]
    assert settings.model_files("checkpoints") == ["linked/unet.safetensors", "sd/text_encoder/diffusion_pytorch_model"
                                                   ".safetensors", "sd/unet/diffusion_pytorch_model.safetensors",
                                                   "sd/vae/diffusion_pytorch_model.safetensors", "single.safetensors"]


def test_model_choices_list_afresh_and_say_where_they_looked(tmp_path: Path) -> None:
    settings = Settings(models_dirs=(tmp_path / "a", tmp_path / "b"))
    choices = ModelChoices("loras")
    assert choices(settings) == []
    (tmp_path / "b" / "loras").mkdir(parents=True)
    (tmp_path / "b" / "loras" / "x.safetensors").write_bytes(b"")
    assert choices(settings) == ["x.safetensors"]
    assert choices.searched(settings) == f"{tmp_path / 'a' / 'loras'}, {tmp_path / 'b' / 'loras'}"


def test_a_model_name_no_file_can_have_is_a_bad_name_without_the_folders(tmp_path: Path) -> None:
    import pytest

    from nodegraph.settings import ModelNameError

    settings = Settings(models_dirs=(tmp_path / "models",))
    for name in ("a" * 256, "x/" + "b" * 300, "/etc/passwd", "../up", "nul\x00", "x\ud800"):
        with pytest.raises(ModelNameError) as refused:
            settings.resolve_model("loras", name)
        assert refused.value.code == "bad_name" and str(tmp_path) not in str(refused.value)
    with pytest.raises(ModelNameError) as refused:  # each part fits, the whole path does not
        settings.resolve_model("loras", "/".join(["c" * 250] * 20))
    assert refused.value.code == "bad_name" and str(tmp_path) not in str(refused.value)
    with pytest.raises(FileNotFoundError) as missing:
        settings.resolve_model("loras", "absent.safetensors")
    assert not isinstance(missing.value, ModelNameError) and str(tmp_path) not in str(missing.value)
