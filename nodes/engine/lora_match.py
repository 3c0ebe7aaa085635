"""Does a LoRA fit a checkpoint? The layers a LoRA file will create, against the checkpoint's own modules.

A LoRA for another architecture (an SDXL LoRA on SD1.5) otherwise fails only when a pipeline loads it,
with a raw size-mismatch dump, or loads partly. Here it is found from headers and configs alone: the
checkpoint's modules are built on the meta device from its configs (no weights, no memory), once per
checkpoint version, and every layer of the file (`lora_files.layers`) must name one of them with the
same input and output size.

Both readings need torch and diffusers (seconds to import), so `nodegraph validate` first tries a proof from
the safetensors headers alone: a PEFT-layout LoRA (the keys diffusers' conversion leaves as they are) on a
diffusers folder, whose weight files name every module with its shape, or on an SD1.x single file, looked up
by ldm name. A fit found that way is a fit; a misfit, or a file the headers cannot settle (Kohya keys, alphas,
DoRA, sharded weights, SDXL single files), goes to the exact reading, so every message stays the one it gives.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from nodes.engine import lora_files
from nodes.engine.checkpoints import detect_family, read_header
from nodes.engine.ldm_keys import unet_key_to_ldm
from nodes.engine.single_file import TEXT_ENCODER, UNET
from nodes.engine.single_file_configs import single_file_config_dir
from nodes.engine.transformer_checkpoints import TRANSFORMER_FAMILIES

_T = TypeVar("_T")
_A = TypeVar("_A")
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# A PEFT-layout key as diffusers saves it; group 1 the component, 2 the module, 3 the matrix.
_PEFT_KEY = re.compile(r"^(unet|transformer|text_encoder|text_encoder_2)\.(.+)\.lora_([AB])\.weight$")
# 2-D weights that are not nn.Linear's: the embeddings of CLIP and T5 (left out, as named_modules' reading does).
_EMBEDDING = re.compile(r"(^|\.)(\w+_embedding|shared|embed_tokens|relative_attention_bias)$")


@dataclass(frozen=True)
class ModelLayers:
    """A checkpoint's LoRA-able layers: component -> module name -> (in, out) size, and its UNet config."""

    name: str
    family: str
    unet_config: str  # JSON, for diffusers' mapping of SGM block names
    modules: dict[str, dict[str, tuple[int, int]]]
    denoiser: str = "unet"  # "transformer" for SD3 and Flux
    partial: bool = False  # a folder holding some components only (text encoders or a VAE from ComfyUI's loaders)


@functools.lru_cache(maxsize=16)
def model_layers(checkpoint: str, fingerprint: str) -> ModelLayers:
    import torch
    from diffusers import UNet2DConditionModel

    path = Path(checkpoint)
    family = detect_family(path)
    modules: dict[str, dict[str, tuple[int, int]]] = {}
    if family in TRANSFORMER_FAMILIES:
        denoiser, unet_config, models = _transformer_models(path)
    else:
        folder = path if path.is_dir() else single_file_config_dir(path, read_header(path), family)
        index = json.loads((folder / "model_index.json").read_text())
        denoiser, unet_config = "unet", UNet2DConditionModel.load_config(folder / "unet")
        with torch.device("meta"):
            models = {"unet": UNet2DConditionModel.from_config(unet_config)}
            models.update(_text_encoders(folder, index))
    for component, model in models.items():
        found = modules[component] = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                found[name] = (module.in_features, module.out_features)
            elif isinstance(module, torch.nn.Conv2d):
                found[name] = (module.in_channels, module.out_channels)
    return ModelLayers(path.name, family, json.dumps(dict(unet_config), sort_keys=True, default=str), modules,
                       denoiser, partial=denoiser not in models)


def _text_encoders(folder: Path, index: dict[str, Any]) -> dict[str, Any]:
    import transformers

    models = {}
    for component in _TEXT_ENCODERS:
        entry = index.get(component) or [None, None]
        if entry[1]:
            model_class = getattr(transformers, entry[1])
            models[component] = model_class(model_class.config_class.from_pretrained(folder / component))
    return models


def _transformer_models(path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """SD3 / Flux: the transformer (from a folder, or a Flux transformer file's derived config) and text encoders."""
    import diffusers
    import torch

    from nodes.engine.transformer_checkpoints import flux_config

    if path.is_dir():
        index = json.loads((path / "model_index.json").read_text())
        if not index["transformer"][1]:  # text encoders only
            with torch.device("meta"):
                return "transformer", {}, _text_encoders(path, index)
        model_class = getattr(diffusers, index["transformer"][1])
        config = model_class.load_config(path / "transformer")
    else:
        index, model_class, config = {}, diffusers.FluxTransformer2DModel, flux_config(path, read_header(path))
    with torch.device("meta"):
        models = {"transformer": model_class.from_config(config)}
        if path.is_dir():
            models.update(_text_encoders(path, index))
    return "transformer", dict(config), models


def mismatch(lora: str, lora_fingerprint: str, checkpoint: str, fingerprint: str) -> str | None:
    """Why the LoRA does not fit the checkpoint (naming the first layer that differs), or None if it fits.

    Raises `lora_files.LoraFileError` for a file whose keys diffusers cannot convert.
    """
    if fits_by_headers(lora, lora_fingerprint, checkpoint, fingerprint):
        return None
    model = model_layers(checkpoint, fingerprint)
    exact = lora_files.layers(lora, lora_fingerprint, model.family, model.unet_config)
    return _first_misfit(model, {component: {module: (layer.in_features, layer.out_features)
                                             for module, layer in found.items()} for component, found in exact.items()})


def _first_misfit(model: ModelLayers, layers: dict[str, dict[str, tuple[int, int]]]) -> str | None:
    for component, found in layers.items():
        have = model.modules.get(component)
        if have is None and model.partial:
            continue  # a folder of some components (DualCLIPLoader's): the rest is another recipe's
        if have is None:
            return f"it has {component} layers, and {model.name} ({model.family}) has no {component}"
        for module, (in_features, out_features) in sorted(found.items()):
            # transformers 5 CLIP models have no `text_model.` level; the LoRA files of every tool do.
            size = have.get(module, have.get(module.removeprefix("text_model.")))
            if size is None:
                return f"its layer {component}.{module} is not a layer of {model.name} ({model.family})"
            if size != (in_features, out_features):
                return (f"layer {component}.{module} is {in_features}→{out_features} in the LoRA and "
                        f"{size[0]}→{size[1]} in {model.name} ({model.family})")
    return None


def block_scales_mismatch(block_scales: str, checkpoint: str, fingerprint: str) -> str | None:
    """What a block-scales JSON names that this UNet lacks (a block without attention, a list of the wrong length)."""
    if not block_scales:
        return None
    quick = _headers(checkpoint, fingerprint)
    if quick is not None and _block_scales_misfit(block_scales, quick) is None:
        return None
    return _block_scales_misfit(block_scales, model_layers(checkpoint, fingerprint))


def _block_scales_misfit(block_scales: str, model: ModelLayers) -> str | None:
    counts: dict[tuple[str, str], int] = {}
    for module in model.modules[model.denoiser]:
        parts = module.split(".")
        if len(parts) > 3 and parts[0] in ("down_blocks", "up_blocks") and parts[2] == "attentions":
            key = (parts[0].removesuffix("_blocks"), f"block_{parts[1]}")
            counts[key] = max(counts.get(key, 0), int(parts[3]) + 1)
    for part, value in json.loads(block_scales).items():
        if part == "mid" or not isinstance(value, dict):
            continue
        for block, scales in value.items():
            layers = counts.get((part, block))
            if layers is None:
                have = ", ".join(b for p, b in sorted(counts) if p == part)
                return f"{part}.{block} has no attention layers in this model (blocks with attention: {have})"
            if isinstance(scales, list) and len(scales) not in (1, layers):
                return f"{part}.{block} has {layers} attention layers; the list has {len(scales)} scales"
    return None


# ------------------------------------------------------------------------- the header-only reading


@functools.lru_cache(maxsize=16)
def header_layers(checkpoint: str, fingerprint: str) -> ModelLayers | None:
    """`model_layers` of a diffusers folder read from its weight files' headers: every 2-D (Linear) and 4-D
    (Conv2d) weight. None where the headers cannot say it: a single file, a component stored in several files
    (shards, variants), a folder without its denoiser."""
    path = Path(checkpoint)
    if not path.is_dir():
        return None
    family = detect_family(path)
    denoiser = "transformer" if family in TRANSFORMER_FAMILIES else "unet"
    index = json.loads((path / "model_index.json").read_text())
    modules: dict[str, dict[str, tuple[int, int]]] = {}
    for component in (denoiser, *_TEXT_ENCODERS):
        if not (index.get(component) or [None, None])[1]:
            continue
        files = list((path / component).glob("*.safetensors"))
        if len(files) != 1:
            return None
        weights = ((key.removesuffix(".weight"), shape) for key, shape in read_header(files[0]).shapes.items()
                   if key.endswith(".weight") and len(shape) in (2, 4))
        modules[component] = {name: (shape[1], shape[0]) for name, shape in weights if not _EMBEDDING.search(name)}
    if denoiser not in modules:
        return None
    config = json.loads((path / denoiser / "config.json").read_text())
    return ModelLayers(path.name, family, json.dumps(config, sort_keys=True, default=str), modules, denoiser)


@functools.lru_cache(maxsize=256)
def peft_layers(path: str, fingerprint: str) -> dict[str, dict[str, tuple[int, int]]] | None:
    """component -> module -> (in, out) size, from the header of a LoRA whose every key is a PEFT-layout
    lora_A/lora_B weight (keys diffusers' conversion leaves as they are); None for any other file."""
    matrices: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}
    for key, shape in read_header(path).shapes.items():
        found = _PEFT_KEY.match(key)
        if found is None or len(shape) < 2:
            return None
        matrices.setdefault((found[1], found[2]), {})[found[3]] = shape
    layers: dict[str, dict[str, tuple[int, int]]] = {}
    for (component, module), pair in matrices.items():
        if set(pair) != {"A", "B"}:
            return None
        layers.setdefault(component, {})[module] = (pair["A"][1], pair["B"][0])
    return layers or None


def fits_by_headers(lora: str, lora_fingerprint: str, checkpoint: str, fingerprint: str) -> bool:
    """True when the safetensors headers alone show that the LoRA fits; False when they cannot tell."""
    layers = _quietly(peft_layers, lora, lora_fingerprint)
    if layers is None:
        return False
    folder = _headers(checkpoint, fingerprint)
    if folder is not None:
        return _first_misfit(folder, layers) is None
    return bool(_quietly(_fits_single_file, checkpoint, layers))


def _fits_single_file(checkpoint: str, layers: dict[str, dict[str, tuple[int, int]]]) -> bool:
    """Whether an SD1.x single file has every layer, looked up in its header by the ldm name single_file.py
    loads it from. Its derived config folder (cached; built once per file) gives the UNet's block layout."""
    path = Path(checkpoint)
    if path.is_dir() or detect_family(path) != "sd15":
        return False
    header = read_header(path)
    config = json.loads((single_file_config_dir(path, header, "sd15") / "unet" / "config.json").read_text())
    up_attention = ["CrossAttn" in kind for kind in config["up_block_types"]]
    for component, found in layers.items():
        for module, size in found.items():
            if component == "unet":
                key = UNET + unet_key_to_ldm(module + ".weight", config["layers_per_block"], up_attention)
            elif component == "text_encoder":
                key = TEXT_ENCODER + ("" if module.startswith("text_model.") else "text_model.") + module + ".weight"
            else:
                return False
            shape = header.shapes.get(key)
            if shape is None or len(shape) not in (2, 4) or (shape[1], shape[0]) != size:
                return False
    return True


def _headers(checkpoint: str, fingerprint: str) -> ModelLayers | None:
    return _quietly(header_layers, checkpoint, fingerprint)


def _quietly(read: Callable[[str, _A], _T], path: str, arg: _A) -> _T | None:
    """The header reading, or None where it fails: the exact reading then decides, and reports the error."""
    try:
        return read(path, arg)
    except Exception:
        return None
