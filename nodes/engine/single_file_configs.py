"""Config folders for single-file checkpoints: every component config of an ldm/SGM-layout file derived from
its tensor shapes (header only, no tensor data), written with tokenizers to a small diffusers-layout folder that
`from_single_file(config=...)` and the direct load (`single_file.py`) read, built once per file header.

What no tensor records (attention head counts, default sample size) comes from the family's published
conventions, unless the file's `__metadata__` carries overrides under `CONFIG_HINTS_KEY` (`_HINTABLE` says which).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodes.engine.checkpoints import (
    _TEXT_ENCODERS,
    CONFIG_HINTS_KEY,
    UNET,
    VAE,
    CorruptCheckpointError,
    NotADiffusionCheckpointError,
    SafetensorsHeader,
    UnknownFamilyError,
    build_once,
)

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

#: Which overrides are honoured, per component (anything else in the hints is ignored).
_HINTABLE = {
    "unet": {"attention_head_dim", "sample_size"},
    "vae": {"sample_size", "scaling_factor"},
    "text_encoder": {"num_attention_heads", "hidden_act"},
    "text_encoder_2": {"num_attention_heads", "hidden_act"},
}
#: Bump when the derivation changes, so that cached config folders are rebuilt.
_DERIVE_VERSION = "1"


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


