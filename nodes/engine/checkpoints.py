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
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline
    from transformers import CLIPTokenizer

#: `__metadata__` key of a single file holding JSON overrides for values that shapes cannot tell.
CONFIG_HINTS_KEY = "nodegraph.config_hints"
#: Which overrides are honoured, per component (anything else in the hints is ignored).
_HINTABLE = {
    "unet": {"attention_head_dim", "sample_size"},
    "vae": {"sample_size", "scaling_factor"},
    "text_encoder": {"num_attention_heads", "hidden_act"},
    "text_encoder_2": {"num_attention_heads", "hidden_act"},
}
#: Bump when the derivation changes, so that cached config folders are rebuilt.
_DERIVE_VERSION = "1"
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
    """The checkpoint needs tokenizer files that are not available offline."""


# ---------------------------------------------------------------------------------------------- header


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a safetensors header says: tensor shapes and the free-form string metadata."""

    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]
    digest: str  # sha256 of the raw header bytes: identifies the file's layout and metadata, cheaply


def require_safetensors(path: Path | str) -> Path:
    """Return `path` if it names an existing `.safetensors` file, else raise a `CheckpointError`."""
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
    if suffix != ".safetensors" or not path.is_file():
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
    single files (default: `default_cache_dir()`).

    Loads are cold-start fast (bench/load.py): modules are built on the meta device, so no random weights are
    made only to be overwritten, and safetensors are memory-mapped, so a weight stored in `torch_dtype` is a
    view of the file's pages (read on first use, never copied) and any other is converted once.
    """
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


def default_cache_dir() -> Path:
    """Where derived single-file config folders go unless told otherwise."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nodegraph" / "single-file-configs"


def single_file_config_dir(
    path: Path, header: SafetensorsHeader, family: str, cache_dir: Path | str | None = None
) -> Path:
    """Return (building it once) the config-only diffusers folder for a single-file checkpoint."""
    if family not in _TEXT_ENCODERS:
        raise UnknownFamilyError(
            path, f"single-file loading supports {', '.join(_TEXT_ENCODERS)}; this file is '{family}'"
        )
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(f"{_DERIVE_VERSION}:{header.digest}".encode()).hexdigest()[:24]
    return build_once(root / f"{family}-{key}",
                      lambda staging: write_pipeline_configs(staging, derive_configs(path, header, family)))


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


@dataclass
class PipelineConfigs:
    """Everything a config-only diffusers folder holds."""

    family: str
    components: dict[str, dict[str, Any]]  # unet / vae / text_encoder(_2) / scheduler config dicts
    tokenizers: dict[str, CLIPTokenizer]


def derive_configs(path: Path, header: SafetensorsHeader, family: str) -> PipelineConfigs:
    """Derive every component config of an ldm-layout single file from its tensor shapes."""
    shapes = header.shapes
    hints = _read_hints(path, header.metadata)
    components: dict[str, dict[str, Any]] = {}
    tokenizers: dict[str, CLIPTokenizer] = {}
    for name, prefix, layout in _TEXT_ENCODERS[family]:
        config = _clip_config(path, shapes, prefix, layout, family)
        config.update(hints.get(name, {}))
        # SD 2.x and SDXL's second tokenizer pad with "!", CLIP-L ones with the end token.
        pad = "!" if layout == "openclip" else "<|endoftext|>"
        from nodes.engine.clip_tokenizers import tokenizer_for

        tokenizer = tokenizer_for(path, config["vocab_size"], pad)
        config.update(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        components[name] = config
        tokenizers[name.replace("text_encoder", "tokenizer")] = tokenizer
    projection = components.get("text_encoder_2", {}).get("projection_dim")
    components["unet"] = {**_unet_config(path, shapes, family, projection), **hints.get("unet", {})}
    components["vae"] = {**_vae_config(path, shapes, family), **hints.get("vae", {})}
    components["scheduler"] = scheduler_config(family)
    return PipelineConfigs(family, components, tokenizers)


def write_pipeline_configs(folder: Path, configs: PipelineConfigs) -> None:
    """Write a diffusers-layout folder with configs and tokenizers only (no weights)."""
    import diffusers

    sdxl = configs.family == "sdxl"
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", configs.components["scheduler"]["_class_name"]],
    }
    if sdxl:
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(safety_checker=[None, None], requires_safety_checker=False)
    for name, config in configs.components.items():
        if name.startswith("text_encoder"):
            index[name] = ["transformers", config["architectures"][0]]
        filename = "scheduler_config.json" if name == "scheduler" else "config.json"
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / filename).write_text(json.dumps(config, indent=2, sort_keys=True))
    for name, tokenizer in configs.tokenizers.items():
        index[name] = ["transformers", "CLIPTokenizer"]
        tokenizer.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def scheduler_config(family: str) -> dict[str, Any]:
    """The scheduler each family ships with (SD 1.5: PNDM, SD 2.1: DDIM v-prediction, SDXL: Euler)."""
    common = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "prediction_type": "epsilon",
    }
    if family == "sd15":
        return {"_class_name": "PNDMScheduler", **common, "skip_prk_steps": True, "set_alpha_to_one": False}
    if family == "sd2":
        return {
            "_class_name": "DDIMScheduler",
            **common,
            "prediction_type": "v_prediction",
            "clip_sample": False,
            "set_alpha_to_one": False,
        }
    if family == "sdxl":
        return {"_class_name": "EulerDiscreteScheduler", **common, "interpolation_type": "linear"}
    raise ValueError(f"no scheduler convention for family '{family}'")


# ---------------------------------------------------------------------------------------------- derivation


def _read_hints(path: Path, metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    raw = metadata.get(CONFIG_HINTS_KEY)
    if not raw:
        return {}
    try:
        hints = json.loads(raw)
    except json.JSONDecodeError:
        raise CorruptCheckpointError(path, f"metadata '{CONFIG_HINTS_KEY}' is not JSON") from None
    return {
        component: {k: v for k, v in dict(values).items() if k in _HINTABLE[component]}
        for component, values in hints.items()
        if component in _HINTABLE and isinstance(values, dict)
    }


def _indices(shapes: Iterable[str], prefix: str) -> list[int]:
    """Sorted distinct N of the keys that start with `prefix` + "N."."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pattern.match(k))})


def _shape(path: Path, shapes: dict[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    try:
        return shapes[key]
    except KeyError:
        raise UnknownFamilyError(path, f"expected tensor '{key}' is missing: unexpected layout") from None


def _unet_config(
    path: Path, shapes: dict[str, tuple[int, ...]], family: str, text_projection_dim: int | None
) -> dict[str, Any]:
    n_inputs = len(_indices(shapes, UNET + "input_blocks."))
    downsamplers = [i for i in range(n_inputs) if UNET + f"input_blocks.{i}.0.op.weight" in shapes]
    # ldm numbers blocks flat: conv_in, then per level `layers_per_block` blocks and one downsampler
    # (none after the last level).
    layers_per_block = downsamplers[0] - 1 if downsamplers else n_inputs - 1
    levels = n_inputs // (layers_per_block + 1)
    if layers_per_block < 1 or levels * (layers_per_block + 1) != n_inputs:
        raise UnknownFamilyError(path, f"unexpected UNet layout ({n_inputs} input blocks)")

    channels, down_types, up_types, depths = [], [], [], []
    for level in range(levels):
        first = 1 + level * (layers_per_block + 1)
        channels.append(_shape(path, shapes, UNET + f"input_blocks.{first}.0.out_layers.3.weight")[0])
        depth = len(_indices(shapes, UNET + f"input_blocks.{first}.1.transformer_blocks."))
        down_types.append("CrossAttnDownBlock2D" if depth else "DownBlock2D")
        depths.append(depth or 1)
        up_first = level * (layers_per_block + 1)
        has_up_attention = bool(_indices(shapes, UNET + f"output_blocks.{up_first}.1.transformer_blocks."))
        up_types.append("CrossAttnUpBlock2D" if has_up_attention else "UpBlock2D")

    attn2 = [k for k in shapes if k.startswith(UNET) and k.endswith("attn2.to_k.weight")]
    proj_in = [k for k in shapes if k.startswith(UNET) and k.endswith(".proj_in.weight")]
    if not attn2 or not proj_in:
        raise UnknownFamilyError(path, "UNet has no cross-attention layers")
    mid_depth = len(_indices(shapes, UNET + "middle_block.1.transformer_blocks."))
    if not mid_depth:
        raise UnknownFamilyError(path, "UNet middle block has no attention")
    if mid_depth != depths[-1]:
        raise UnknownFamilyError(path, "UNet middle block depth differs from the last level's")
    config: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": _shape(path, shapes, UNET + "input_blocks.0.0.weight")[1],
        "out_channels": _shape(path, shapes, UNET + "out.2.weight")[0],
        "block_out_channels": channels,
        "layers_per_block": layers_per_block,
        "down_block_types": down_types,
        "up_block_types": up_types,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": shapes[attn2[0]][1],
        "transformer_layers_per_block": depths if len(set(depths)) > 1 else depths[0],
        # ldm stores the projections as 1x1 convolutions (SD 1.x) or linear layers (SD 2.x, SDXL).
        "use_linear_projection": len(shapes[proj_in[0]]) == 2,
        # Head counts are not in any shape: SD 1.x uses 8 heads, SD 2.x / SDXL heads of 64 channels.
        "attention_head_dim": 8 if family == "sd15" else [max(1, c // 64) for c in channels],
        "sample_size": {"sd15": 64, "sd2": 96, "sdxl": 128}[family],
        "upcast_attention": family == "sd2",
    }
    if UNET + "label_emb.0.0.weight" in shapes:
        # SDXL conditions on 6 size/crop numbers, each embedded, plus the pooled text embedding.
        if text_projection_dim is None:
            raise UnknownFamilyError(path, "UNet has an added embedding but no pooled text encoder")
        added_input = shapes[UNET + "label_emb.0.0.weight"][1]
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=(added_input - text_projection_dim) // 6,
            projection_class_embeddings_input_dim=added_input,
        )
    return config


def _vae_config(path: Path, shapes: dict[str, tuple[int, ...]], family: str) -> dict[str, Any]:
    levels = _indices(shapes, VAE + "encoder.down.")
    if not levels:
        raise NotADiffusionCheckpointError(path, "has no VAE (first_stage_model) weights")
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": _shape(path, shapes, VAE + "encoder.conv_in.weight")[1],
        "out_channels": _shape(path, shapes, VAE + "decoder.conv_out.weight")[0],
        "latent_channels": _shape(path, shapes, VAE + "decoder.conv_in.weight")[1],
        "block_out_channels": [shapes[VAE + f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels],
        "layers_per_block": len(_indices(shapes, VAE + "encoder.down.0.block.")),
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "scaling_factor": 0.13025 if family == "sdxl" else 0.18215,
        "sample_size": {"sd15": 512, "sd2": 768, "sdxl": 1024}[family],
    }


def _clip_config(
    path: Path, shapes: dict[str, tuple[int, ...]], prefix: str, layout: str, family: str
) -> dict[str, Any]:
    if layout == "hf":
        base = prefix + "text_model."
        vocab, hidden = _shape(path, shapes, base + "embeddings.token_embedding.weight")
        positions = _shape(path, shapes, base + "embeddings.position_embedding.weight")[0]
        layers = len(_indices(shapes, base + "encoder.layers."))
        intermediate = _shape(path, shapes, base + "encoder.layers.0.mlp.fc1.weight")[0]
        projection = shapes.get(prefix + "text_projection.weight", (hidden,))[0]
        architecture, activation = "CLIPTextModel", "quick_gelu"  # OpenAI CLIP-L
    else:
        vocab, hidden = _shape(path, shapes, prefix + "token_embedding.weight")
        positions = _shape(path, shapes, prefix + "positional_embedding")[0]
        layers = len(_indices(shapes, prefix + "transformer.resblocks."))
        intermediate = _shape(path, shapes, prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        projection = shapes.get(prefix + "text_projection", (hidden, hidden))[1]
        activation = "gelu"  # OpenCLIP
        if family == "sd2":
            # SD 2.x conditions on the penultimate layer; diffusers drops the last one.
            layers -= 1
        architecture = "CLIPTextModel" if family == "sd2" else "CLIPTextModelWithProjection"
    if not layers:
        raise UnknownFamilyError(path, f"text encoder under '{prefix}' has no layers")
    return {
        "architectures": [architecture],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),  # every released CLIP uses heads of 64 channels
        "max_position_embeddings": positions,
        "projection_dim": projection,
        "hidden_act": activation,
        "layer_norm_eps": 1e-5,
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
