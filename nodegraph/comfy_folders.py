"""ComfyUI's model-folder conventions: its folder aliases and its `extra_model_paths.yaml`.

    folders = read_extra_model_paths(Path("extra_model_paths.yaml"))   # [("checkpoints", Path(...)), …]

The file has named sections (`comfyui:`, `a111:`, …), each an optional `base_path` (`~` and `$VARS`
expanded), an optional `is_default` (its folders searched first) and per-kind folders: one path, or several
in a multi-line value (`loras: |` then a path a line). A relative folder is taken from `base_path`, else
from the file's own folder, as is a relative `base_path`. Kinds are ComfyUI's folder names, its old ones
mapped as ComfyUI does (`unet` is `diffusion_models`, `clip` is `text_encoders`); kinds this runtime has no
loader for are kept and unused.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

FILE_NAME = "extra_model_paths.yaml"
# ComfyUI's old folder names → the kind they hold now.
LEGACY_KINDS = {"unet": "diffusion_models", "clip": "text_encoders"}
# The folders a models root holds a kind in besides `<root>/<kind>` (ComfyUI's defaults list both).
ALIASES = {"diffusion_models": ("unet",), "text_encoders": ("clip",), "controlnet": ("t2i_adapter",)}


class ExtraPathsError(ValueError):
    """An extra_model_paths.yaml that cannot be read, or is not ComfyUI's shape."""


def kind_of(folder_name: str) -> str:
    return LEGACY_KINDS.get(folder_name, folder_name)


def read_extra_model_paths(path: Path) -> list[tuple[str, Path, bool]]:
    """The (kind, folder, is_default) entries of an extra_model_paths.yaml, in the file's order."""
    # Imported here (only an install with such a file pays for it), untyped: PyYAML ships no type hints.
    yaml: Any = importlib.import_module("yaml")

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ExtraPathsError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    except yaml.YAMLError as exc:
        raise ExtraPathsError(f"{path}: not YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ExtraPathsError(f"{path}: expected named sections, such as 'comfyui:' with 'base_path' and folders")
    found: list[tuple[str, Path, bool]] = []
    for section, entries in data.items():
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise ExtraPathsError(f"{path}: section {section!r} must hold 'base_path' and folders by kind")
        base = entries.get("base_path")
        if base is not None and not isinstance(base, str):
            raise ExtraPathsError(f"{path}: {section}.base_path must be a path")
        default = bool(entries.get("is_default", False))
        here = path.resolve().parent
        if base is not None:
            base = os.path.join(here, os.path.expandvars(os.path.expanduser(base)))  # an absolute one stays
        for kind, value in entries.items():
            if kind in ("base_path", "is_default") or value is None:
                continue
            if not isinstance(value, str):
                raise ExtraPathsError(f"{path}: {section}.{kind} must be a path, or paths one a line")
            for line in value.split("\n"):
                line = line.strip()
                if not line:
                    continue
                folder = Path(base if base is not None else here, line)  # an absolute line stays as it is
                found.append((kind_of(str(kind)), folder, default))
    return found


def load_extra_model_paths(files: list[Path]) -> tuple[tuple[str, Path], ...]:
    """Every file's folders by kind, those marked `is_default` first (as ComfyUI searches them)."""
    entries = [entry for file in files for entry in read_extra_model_paths(file)]
    first = [(kind, folder) for kind, folder, default in entries if default]
    return tuple(first + [(kind, folder) for kind, folder, default in entries if not default])

