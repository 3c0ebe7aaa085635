"""Where things live: model folders, the input and output folders, node-pack folders.

Model folders come from `--models-dir` (repeatable, several roots as ComfyUI's extra model
paths), else the `NODEGRAPH_MODELS` environment variable (paths joined by the OS path separator),
else a config file, else `./models`. The config file is `$NODEGRAPH_CONFIG`, else `./nodegraph.json`:
`{"models_dirs": ["/data/models", "models"], "output_dir": "outputs", "input_dir": "input"}` (relative
paths are taken from the file's folder). Model files are named by their path relative to `<root>/<kind>/`,
input images (LoadImage, uploads) by their path relative to the input folder (`--input-dir`, default
`./input`). ComfyUI's layouts count too: a kind's old folder name in a root (`clip/` for `text_encoders`,
`unet/` for `diffusion_models`), and the folders of an `extra_model_paths.yaml` (`./extra_model_paths.yaml`
and `--extra-model-paths FILE`: `comfy_folders`), searched after the roots. `.sft` files are safetensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodegraph.comfy_folders import ALIASES, FILE_NAME, ExtraPathsError, load_extra_model_paths
from nodegraph.model_listing import list_folder

if TYPE_CHECKING:
    from nodegraph.schema import Upstream

# Which of a kind's files fit the model a node is connected to: (fits(name), the model's family), or None
# when that is not known. Given by the node pack (nodegraph knows no model families).
FitHint = Callable[["Settings | None", "Callable[[str], Upstream | None]"],
                   "tuple[Callable[[str], bool], str] | None"]

DEFAULT_MODELS_DIR = Path("models")
DEFAULT_OUTPUT_DIR = Path("outputs")
DEFAULT_INPUT_DIR = Path("input")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
MAX_IMAGE_SIDE, MAX_IMAGE_PIXELS = 16384, 1 << 26  # input images: ComfyUI's largest side; 64 megapixels a frame
MAX_PART_BYTES = 255  # a file or folder name, on common file systems
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")  # listed by ComfyUI, never here
MODEL_SUFFIXES = (".safetensors", ".sft")  # `.sft`: the safetensors files some releases (Flux's) are named with


class ModelNameError(FileNotFoundError):
    """A model name no file can have (absolute, `..`, a part over 255 bytes, not text): error code `bad_name`."""

    code = "bad_name"


def model_name_problem(name: str, kind: str) -> str | None:
    """Why `name` cannot name a model of `kind` (never naming a folder of the server); None when it can."""
    shown = repr(name if len(name) <= 60 else name[:60] + "…")
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts:
        return f"{shown} is not a model name (a path relative to the {kind} folder)"
    if "\x00" in name:
        return f"{shown} is not a model name (it holds a NUL character)"
    try:
        sizes = [len(os.fsencode(part)) for part in parts]
    except UnicodeEncodeError:
        return f"{shown} is not a model name (it is not valid Unicode text)"
    if max(sizes) > MAX_PART_BYTES:
        return f"{shown} is not a model name: a file name has at most {MAX_PART_BYTES} bytes per folder or file part"
    return None


@dataclass(frozen=True)
class Settings:
    models_dirs: tuple[Path, ...] = (DEFAULT_MODELS_DIR,)
    output_dir: Path = DEFAULT_OUTPUT_DIR
    nodes_dirs: tuple[Path, ...] = field(default_factory=tuple)
    input_dir: Path = DEFAULT_INPUT_DIR
    extra_folders: tuple[tuple[str, Path], ...] = ()  # (kind, folder) from extra_model_paths.yaml files

    @property
    def temp_dir(self) -> Path:
        return self.output_dir / ".temp"

    @classmethod
    def from_args(cls, models_dirs: Sequence[str] = (), output_dir: str | None = None,
                  nodes_dirs: Sequence[str] = (), input_dir: str | None = None,
                  extra_model_paths: Sequence[str] = ()) -> Settings:
        config = read_config()
        files = [Path(p) for p in extra_model_paths]
        if Path(FILE_NAME).is_file():  # as ComfyUI, the one in the working folder is read without being named
            files.insert(0, Path(FILE_NAME))
        try:
            extra = load_extra_model_paths(files)
        except ExtraPathsError as exc:
            raise ConfigError(str(exc)) from None
        roots = [Path(p) for p in models_dirs]
        if not roots and os.environ.get("NODEGRAPH_MODELS"):
            roots = [Path(p) for p in os.environ["NODEGRAPH_MODELS"].split(os.pathsep) if p]
        roots = roots or config.get("models_dirs", [])
        output = Path(output_dir) if output_dir else config.get("output_dir", DEFAULT_OUTPUT_DIR)
        inputs = Path(input_dir) if input_dir else config.get("input_dir", DEFAULT_INPUT_DIR)
        return cls(models_dirs=tuple(roots) or (DEFAULT_MODELS_DIR,), output_dir=output,
                   nodes_dirs=tuple(Path(p) for p in nodes_dirs), input_dir=inputs, extra_folders=extra)

    def kind_folders(self, kind: str) -> list[Path]:
        """The folders models of `kind` are looked for in, in order: each root's `<kind>/` and its ComfyUI
        aliases (`clip/`, `unet/`), then the extra_model_paths.yaml folders of that kind."""
        found = [root / name for root in self.models_dirs for name in (kind, *ALIASES.get(kind, ()))]
        return found + [folder for of, folder in self.extra_folders if of == kind]

    def model_files(self, kind: str, suffixes: Sequence[str] = MODEL_SUFFIXES,
                    folders: bool | str = False) -> list[str]:
        """Names of the models of one kind ("checkpoints", "loras") across every root, sorted.

        Files added or removed show at once (each folder's listing is cached until its mtime changes:
        `model_listing`, which also bounds a walk through linked folders). With `folders`, a diffusers folder
        (one with `model_index.json`, or the file `folders` names) is one model and the files inside are its parts.
        """
        marker = folders if isinstance(folders, str) else "model_index.json" if folders else None
        names: set[str] = set()
        for folder in self.kind_folders(kind):
            names.update(list_folder(folder, suffixes, marker)[0])
        return sorted(names)

    def searched(self, kind: str) -> str:
        """The folders models of `kind` are looked for in, for messages."""
        return ", ".join(str(folder) for folder in self.kind_folders(kind))

    def resolve_model(self, kind: str, name: str) -> Path:
        """The path of a model by its name, confined to the model folders.

        Names are relative paths without `..`; symlinks inside a models folder are followed, since
        linking models in from another disk is how many people share them between tools.
        Every model name is resolved here; a name no file can have is a `ModelNameError` (`bad_name`).
        """
        problem = model_name_problem(name, kind)
        if problem is not None:
            raise ModelNameError(problem)
        for folder in self.kind_folders(kind):
            candidate = Path(os.path.abspath(folder / name))
            try:
                if candidate.exists():
                    return candidate
            except OSError as exc:  # e.g. a whole path too long: told without the server's folders
                raise ModelNameError(f"{name[:60]!r} cannot be looked up: {exc.strerror or exc}") from None
        # The folders are not named: this message reaches API clients (validation says where it looked).
        raise FileNotFoundError(f"no {kind} model named {name[:200]!r} in the models folders' {kind}/")

    def input_files(self, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[str]:
        """Names of the files in the input folder (subfolders included, hidden ones not), sorted."""
        base = self.input_dir
        if not base.is_dir():
            return []
        return sorted(path.relative_to(base).as_posix() for path in base.rglob("*")
                      if path.is_file() and path.suffix.lower() in suffixes
                      and not any(part.startswith(".") for part in path.relative_to(base).parts))

    def resolve_input(self, name: str) -> Path:
        """The path of an input file by its name, confined to the input folder as model names are; a name no
        file can have is a `ModelNameError` (`bad_name`), as for models."""
        problem = model_name_problem(name, "input")
        if problem is not None:
            raise ModelNameError(problem.replace("a model name", "an input file name"))
        candidate = Path(os.path.abspath(self.input_dir / name))
        try:
            found = candidate.is_file()
        except OSError as exc:  # e.g. a whole path too long: told without the server's folders
            raise ModelNameError(f"{name[:60]!r} cannot be looked up: {exc.strerror or exc}") from None
        if not found:
            raise FileNotFoundError(f"no file named {name[:200]!r} in the input folder")
        return candidate


@dataclass(frozen=True)
class ModelChoices:
    """A COMBO's choices that are model files: `Input("checkpoint", "COMBO", choices=ModelChoices("checkpoints"))`.

    Called with the settings, it lists the models afresh. When a name is not among them, validation
    (one way for every model-file input) offers the closest name, lists those that fit the connected
    model first (`hint`), names the folders it searched, and calls a name no file can have `bad_name`.
    """

    kind: str
    folders: bool = False  # diffusers folders count as models too
    hint: FitHint | None = field(default=None, compare=False)
    listing: Callable[[Settings], list[str]] | None = field(default=None, compare=False)  # a kind's own layout

    def __call__(self, settings: Settings | None) -> list[str]:
        if self.listing is not None:
            return self.listing(settings or Settings())
        return (settings or Settings()).model_files(self.kind, folders=self.folders)

    def searched(self, settings: Settings | None) -> str:
        return (settings or Settings()).searched(self.kind)

    def name_problem(self, name: str) -> str | None:
        """Why `name` can be no model file at all (validation reports it as `bad_name`)."""
        return model_name_problem(name, self.kind)

    def format_problem(self, name: str) -> str | None:
        """Why a file of this name is never loaded (validation reports it as `unsafe_format`): a pickle."""
        suffix = os.path.splitext(name)[1].lower()
        if suffix not in PICKLE_SUFFIXES:
            return None
        return (f"{name[:60]!r}: '{suffix}' is a pickle-based format, and unpickling can run arbitrary code; only "
                ".safetensors (or .sft) files are loaded (convert it to safetensors first)")


class ConfigError(ValueError):
    """The config file cannot be read or has the wrong shape."""


def read_config() -> dict[str, Any]:
    """The config file's settings as paths (see the module docstring); {} when there is none."""
    path = Path(os.environ.get("NODEGRAPH_CONFIG") or "nodegraph.json")
    if not path.is_file():
        if os.environ.get("NODEGRAPH_CONFIG"):
            raise ConfigError(f"config file {path} (from NODEGRAPH_CONFIG) does not exist")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a JSON object")
    roots, output, inputs = data.get("models_dirs", []), data.get("output_dir"), data.get("input_dir")
    if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots) \
            or not all(isinstance(folder, (str, type(None))) for folder in (output, inputs)):
        raise ConfigError(f'config file {path}: expected {{"models_dirs": [paths], "output_dir": path, '
                          '"input_dir": path}')
    base = path.parent
    config: dict[str, Any] = {"models_dirs": [base / r for r in roots]}
    if output:
        config["output_dir"] = base / output
    if inputs:
        config["input_dir"] = base / inputs
    return config
