"""Where things live: model folders, the output folder, node-pack folders.

Model folders come from `--models-dir` (repeatable, several roots as ComfyUI's extra model
paths), then the `NODEGRAPH_MODELS` environment variable (paths joined by the OS path separator).
Model files are named by their path relative to the `<root>/<kind>/` folder they are found in.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODELS_DIR = Path("models")
DEFAULT_OUTPUT_DIR = Path("outputs")


@dataclass(frozen=True)
class Settings:
    models_dirs: tuple[Path, ...] = (DEFAULT_MODELS_DIR,)
    output_dir: Path = DEFAULT_OUTPUT_DIR
    nodes_dirs: tuple[Path, ...] = field(default_factory=tuple)

    @property
    def temp_dir(self) -> Path:
        return self.output_dir / ".temp"

    @classmethod
    def from_args(cls, models_dirs: Sequence[str] = (), output_dir: str | None = None,
                  nodes_dirs: Sequence[str] = ()) -> Settings:
        roots = [Path(p) for p in models_dirs]
        if not roots and os.environ.get("NODEGRAPH_MODELS"):
            roots = [Path(p) for p in os.environ["NODEGRAPH_MODELS"].split(os.pathsep) if p]
        return cls(models_dirs=tuple(roots) or (DEFAULT_MODELS_DIR,),
                   output_dir=Path(output_dir) if output_dir else DEFAULT_OUTPUT_DIR,
                   nodes_dirs=tuple(Path(p) for p in nodes_dirs))

    def model_files(self, kind: str, suffixes: Sequence[str] = (".safetensors",),
                    folders: bool = False) -> list[str]:
        """Names of the models of one kind ("checkpoints", "loras") across every root, sorted."""
        names: set[str] = set()
        for root in self.models_dirs:
            base = root / kind
            if not base.is_dir():
                continue
            for path in base.rglob("*"):
                if path.name.startswith("."):
                    continue
                if (path.is_file() and path.suffix.lower() in suffixes) or (
                        folders and path.is_dir() and (path / "model_index.json").is_file()):
                    names.add(path.relative_to(base).as_posix())
        return sorted(names)

    def resolve_model(self, kind: str, name: str) -> Path:
        """The path of a model by its name, confined to the model folders.

        Names are relative paths without `..`; symlinks inside a models folder are followed, since
        linking models in from another disk is how many people share them between tools.
        """
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts:
            raise FileNotFoundError(f"{name!r} is not a model name (a path relative to the {kind} folder)")
        for root in self.models_dirs:
            candidate = Path(os.path.abspath(root / kind / name))
            if candidate.exists():
                return candidate
        raise FileNotFoundError(f"no {kind} model named {name!r} in " +
                                ", ".join(str(r / kind) for r in self.models_dirs))
