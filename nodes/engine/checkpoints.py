"""Offline inspection and loading of diffusion checkpoints: diffusers folders and single safetensors files.

    detect_family(path)                          -> "sd15" | "sd2" | "sdxl" | "sdxl-refiner" | "sd3" | "flux"
    load_pipeline(path, torch_dtype, cache_dir)  -> a diffusers pipeline (every family as a folder; sd15, sd2 and
                                                    sdxl single files; Flux transformer-only files)

Rules this module keeps:
- Only safetensors are read. `.ckpt`/`.pt`/`.bin` and any other pickle are refused before a byte of them is
  interpreted: unpickling runs arbitrary code.
- Nothing is downloaded. `from_single_file` normally fetches the component configs from the hub; instead we
  derive them from the file's tensor shapes (read from the header only, no tensor data) and write them, with
  a tokenizer, to a small diffusers-layout folder in a cache dir keyed by a hash of the header. That folder is
  handed to `from_single_file(config=...)`.
- Shapes tell almost everything. What no tensor records (attention head counts, default sample size) comes
  from the family's published conventions, unless the file's `__metadata__` carries overrides under
  `CONFIG_HINTS_KEY` (the bundled demo models write these, since they are too small for the conventions).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

#: `__metadata__` key of a single file holding JSON overrides for values that shapes cannot tell.
CONFIG_HINTS_KEY = "nodegraph.config_hints"
#: Vocabulary size of the real CLIP BPE (OpenAI CLIP-L and OpenCLIP share it).
_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
# Bytes per element, to check that each tensor's byte range matches its shape.
_DTYPE_SIZES = {
    **dict.fromkeys(("F64", "I64", "U64"), 8),
    **dict.fromkeys(("F32", "I32", "U32"), 4),
    **dict.fromkeys(("F16", "BF16", "I16", "U16"), 2),
    **dict.fromkeys(("I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"), 1),
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024

UNET = "model.diffusion_model."
VAE = "first_stage_model."
# Where each family keeps its text encoders in the original (ldm / SGM) layout, and in which layout:
# "hf" is a transformers CLIPTextModel under `text_model.`, "openclip" is OpenCLIP's own module names.
_TEXT_ENCODERS: dict[str, list[tuple[str, str, str]]] = {
    "sd15": [("text_encoder", "cond_stage_model.transformer.", "hf")],
    "sd2": [("text_encoder", "cond_stage_model.model.", "openclip")],
    "sdxl": [
        ("text_encoder", "conditioner.embedders.0.transformer.", "hf"),
        ("text_encoder_2", "conditioner.embedders.1.model.", "openclip"),
    ],
}
LOADABLE_SINGLE_FILE_FAMILIES = tuple(_TEXT_ENCODERS)


class CheckpointError(ValueError):
    """A checkpoint that cannot be inspected or loaded; the message names the file and the reason."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path does not exist."""


class UnsafeFormatError(CheckpointError):
    """Not a safetensors file (pickle-based formats are refused, never unpickled)."""


class CorruptCheckpointError(CheckpointError):
    """A safetensors file whose header or size is inconsistent (truncated, damaged, or not safetensors)."""


class NotADiffusionCheckpointError(CheckpointError):
    """A valid safetensors file that holds no diffusion model (a LoRA, a lone VAE, a text encoder, ...)."""


class UnknownFamilyError(CheckpointError):
    """A diffusion checkpoint of a family this module cannot recognise or cannot load."""


class MissingTokenizerError(CheckpointError):
    """The checkpoint needs tokenizer files that are not available offline. Its message names the file, not its
    folders: it is what a user reads (code `missing_tokenizer`), about a file they chose from a list."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(path, reason)
        self.args = (f"{self.path.name}: {reason}",)


# ---------------------------------------------------------------------------------------------- header


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a safetensors header says: tensor shapes and the free-form string metadata."""

    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]
    digest: str  # sha256 of the raw header bytes: identifies the file's layout and metadata, cheaply


def require_safetensors(path: Path | str) -> Path:
    """Return `path` if it names an existing `.safetensors` (or `.sft`, the same format) file, else raise a
    `CheckpointError`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in _PICKLE_SUFFIXES:
        raise UnsafeFormatError(
            path,
            f"'{suffix}' is a pickle-based format, and unpickling can run arbitrary code; only .safetensors "
            "files are loaded (convert it to safetensors first)",
        )
    if not path.exists():
        raise CheckpointNotFoundError(path, "no such file")
    if suffix not in (".safetensors", ".sft") or not path.is_file():
        raise UnsafeFormatError(path, "only .safetensors files are loaded")
    return path


def read_header(path: Path | str) -> SafetensorsHeader:
    """Read and validate a safetensors header without reading any tensor data."""
    path = require_safetensors(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(9)
        header_len = int.from_bytes(prefix[:8], "little")
        plausible = len(prefix) == 9 and prefix[8:9] == b"{" and header_len <= min(size - 8, _MAX_HEADER_BYTES)
        # A pickle starts with 0x80 and a torch.save archive with "PK", but so may a safetensors header
        # length (0x80 is its low byte once in 256 files): only a file that is not plausibly safetensors
        # is called a pickle.
        if not plausible and (prefix[:4] == b"PK\x03\x04" or prefix[:1] == b"\x80"):
            raise UnsafeFormatError(path, "this is a pickle / torch.save archive named .safetensors; refused")
        if len(prefix) < 9:
            raise CorruptCheckpointError(path, f"file is {size} bytes, too short for a safetensors header")
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise CorruptCheckpointError(path, "header length exceeds the file: truncated or not safetensors")
        f.seek(8)
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError(path, "__metadata__ is not an object")
    shapes: dict[str, tuple[int, ...]] = {}
    data_end = 0
    for name, info in header.items():
        try:
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(path, f"malformed header entry for tensor '{name}'") from None
        item = _DTYPE_SIZES.get(dtype)
        if begin < 0 or end < begin or (item is not None and end - begin != math.prod(shape) * item):
            raise CorruptCheckpointError(path, f"tensor '{name}' has inconsistent offsets for its shape")
        shapes[name] = shape
        data_end = max(data_end, end)
    if 8 + header_len + data_end != size:
        what = "truncated" if 8 + header_len + data_end > size else "has trailing bytes"
        raise CorruptCheckpointError(
            path, f"file {what}: header describes {8 + header_len + data_end} bytes, file has {size}"
        )
    digest = hashlib.sha256(raw).hexdigest()
    return SafetensorsHeader(shapes, {str(k): str(v) for k, v in metadata.items()}, digest)


# ---------------------------------------------------------------------------------------------- family


def detect_family(path: Path | str) -> str:
    """Name the model family of a diffusers folder or a single safetensors file (header only)."""
    path = Path(path)
    if path.is_dir():
        return _folder_family(path)
    return _single_file_family(path, read_header(path).shapes)


def _folder_family(folder: Path) -> str:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise NotADiffusionCheckpointError(folder, "folder has no model_index.json (not a diffusers pipeline)")
    try:
        index = json.loads(index_path.read_text())
        class_name = str(index["_class_name"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CorruptCheckpointError(index_path, "model_index.json is unreadable or has no _class_name") from None
    if class_name.startswith("StableDiffusionXL"):
        text_encoder = index.get("text_encoder") or [None]
        return "sdxl" if text_encoder[0] else "sdxl-refiner"
    if class_name.startswith("StableDiffusion3"):
        return "sd3"
    if class_name.startswith("Flux"):
        return "flux"
    if class_name.startswith("StableDiffusion"):
        # SD 2.x UNets project attention with linear layers; SD 1.x with 1x1 convolutions.
        unet_config = _read_json(folder / "unet" / "config.json")
        return "sd2" if unet_config.get("use_linear_projection") else "sd15"
    raise UnknownFamilyError(folder, f"unknown pipeline class '{class_name}'")


def _single_file_family(path: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in shapes)

    if has(UNET + "joint_blocks.") or has("joint_blocks."):
        return "sd3"
    if has(UNET + "double_blocks.") or has("double_blocks."):
        return "flux"
    if has(UNET):
        # The text encoders' layout tells the family apart more reliably than UNet sizes (which fine-tunes
        # and our tiny demo models do not share).
        if has("conditioner.embedders.1.model."):
            return "sdxl"
        if has("conditioner.embedders.0.model."):
            return "sdxl-refiner"
        if has("cond_stage_model.model."):
            return "sd2"
        if has("cond_stage_model.transformer."):
            return "sd15"
        raise UnknownFamilyError(path, "has a UNet but no text encoder of a known layout")
    if any(".lora_" in k or k.startswith(("lora_unet_", "lora_te")) for k in shapes):
        raise NotADiffusionCheckpointError(path, "this is a LoRA, not a checkpoint (put it in loras/)")
    if has("unet.") or has("down_blocks.") or has("transformer_blocks."):
        raise NotADiffusionCheckpointError(
            path, "holds a single diffusers component, not a full checkpoint (use a diffusers folder)"
        )
    raise NotADiffusionCheckpointError(path, "no diffusion model weights found in this file")


# ---------------------------------------------------------------------------------------------- loading


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def load_pipeline(
    path: Path | str, torch_dtype: torch.dtype | None = None, cache_dir: Path | str | None = None,
    text_encoder_dtype: torch.dtype | None = None,
) -> DiffusionPipeline:
    """Load a diffusers folder or a single safetensors checkpoint, offline, without unpickling anything.

    `torch_dtype` defaults to float32; `text_encoder_dtype` (default: the same) is the text encoders' own, read
    from the files in it (not rounded through `torch_dtype`). `cache_dir` holds the derived config folders of
    single files (default: `single_file_configs.default_cache_dir()`).

    Loads are cold-start fast (bench/load.py): modules are built on the meta device, so no random weights are
    made only to be overwritten, and safetensors are memory-mapped, so a weight stored in `torch_dtype` is a
    view of the file's pages (read on first use, never copied) and any other is converted once.

    Every tensor of the loaded pipeline is checked once, as loaded (in its load dtype: a cast to fp16 can
    overflow): one with NaN or Inf is a `CorruptCheckpointError` naming the component and the tensor, raised
    before the pipeline is used (a NaN weight only ever samples black images).
    """
    path = Path(path)
    pipe = _load_pipeline(path, torch_dtype, cache_dir, text_encoder_dtype)
    _require_finite(path, pipe)
    return pipe


def _require_finite(path: Path, pipe: DiffusionPipeline) -> None:
    import torch

    from nodes.engine.finite import first_non_finite

    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            tensors = ((key, t) for key, t in module.state_dict().items() if t.device.type != "meta")
            bad = first_non_finite(tensors)
            if bad is not None:
                raise CorruptCheckpointError(path, f"the {name} tensor {bad!r} holds NaN or Inf values (a damaged "
                                                   "or badly converted file); it would sample black images")


def _load_pipeline(
    path: Path, torch_dtype: torch.dtype | None, cache_dir: Path | str | None, text_encoder_dtype: torch.dtype | None,
) -> DiffusionPipeline:
    import torch
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    dtype = torch.float32 if torch_dtype is None else torch_dtype
    encoders = text_encoder_dtype or dtype
    path = Path(path)
    # diffusers' defaults, spelled out. Without accelerate, diffusers quietly falls back to building every module
    # on the CPU before loading the weights (for single files: a second, private copy of a full-size model), so
    # its absence is an error here.
    _require_accelerate(path)
    fast = {"low_cpu_mem_usage": True, "disable_mmap": False}
    if path.is_dir():
        family = _folder_family(path)  # validates the folder
        try:
            # use_safetensors=True makes diffusers fail rather than fall back to pickled .bin weights.
            per_component = {"default": dtype, **dict.fromkeys(TEXT_ENCODERS, encoders)}
            pipe = DiffusionPipeline.from_pretrained(
                path, dtype=dtype if encoders == dtype else per_component, local_files_only=True,
                use_safetensors=True, **fast, **_absent(path)
            )
        except Exception as e:  # diffusers raises many types here; tie them to the folder
            raise CheckpointError(path, f"diffusers could not load it as {family}: {e}") from e
        return cast("DiffusionPipeline", pipe)
    header = read_header(path)
    family = _single_file_family(path, header.shapes)
    if family in ("sd3", "flux"):
        from nodes.engine.transformer_checkpoints import load_transformer_file

        return cast("DiffusionPipeline", load_transformer_file(path, family, dtype))
    from nodes.engine.single_file_configs import single_file_config_dir

    config_dir = single_file_config_dir(path, header, family, cache_dir)
    if family == "sd15":
        from nodes.engine.single_file import load_sd15_file

        direct = load_sd15_file(path, header, config_dir, dtype, encoders)
        if direct is not None:
            return cast("DiffusionPipeline", direct)
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    try:
        with _skip_init_on_meta():
            pipe = pipeline_class.from_single_file(
                str(path), config=str(config_dir), local_files_only=True, dtype=encoders, **fast
            )
    except Exception as e:  # diffusers raises many types here; tie them to the file
        raise CheckpointError(path, f"diffusers could not load it as {family}: {e}") from e
    if encoders != dtype:  # from_single_file takes one dtype: the rest is cast from the text encoders'
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module) and name not in TEXT_ENCODERS:
                module.to(dtype)
    return cast("DiffusionPipeline", pipe)


def _absent(folder: Path) -> dict[str, None]:
    """The components a folder's model_index.json lists as null (a folder of only some components, as ComfyUI's
    split loaders make), passed as None: diffusers insists on every component of the pipeline class."""
    index = _read_json(folder / "model_index.json")
    return {name: None for name, entry in index.items() if not name.startswith("_") and entry == [None, None]}


def _require_accelerate(path: Path) -> None:
    from diffusers.utils import is_accelerate_available

    if not is_accelerate_available():
        raise CheckpointError(path, "loading needs the `accelerate` package (pip install accelerate)")


def _skip_init_on_meta() -> AbstractContextManager[None]:
    """transformers' `no_init_weights`, for single files only.

    diffusers' `from_single_file` builds each component under accelerate's `init_empty_weights`, on the meta
    device, but still runs every module's random init there: ≈900 calls for SD1.5 that allocate nothing and
    cost ≈0.15 s of a 0.9 s load from the page cache. Its `from_pretrained` already skips them the same way.
    Like diffusers' own context, this swaps torch.nn.init's functions process-wide while it is active.
    """
    from transformers.initialization import no_init_weights

    return cast("AbstractContextManager[None]", no_init_weights())


def build_once(target: Path, write: Callable[[Path], None]) -> Path:
    """`target`, a diffusers folder `write` fills, unless it is already there. Built beside the target and
    renamed, so a concurrent or interrupted build never leaves half a folder."""
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        write(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
