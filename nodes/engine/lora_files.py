"""LoRA files: which format, which components and ranks, and which layers diffusers will make of them.

Two readings, both without loading a pipeline:
- `inspect(path)`, from the safetensors header alone: the format (refusing, by name, the formats that cannot
  be loaded exactly), the components the file has layers for and the largest rank (for LyCORIS formats, of
  the LoRA `lora_convert` rewrites them into). Used by LoadLoRA's and HotswapLoRA's checks before anything runs.
- `layers(path, fingerprint, family, unet_config)`: the exact PEFT layers `load_lora_weights` will create, by
  component and module name, with their shapes. It runs diffusers' own key conversion (every layout diffusers
  converts: PEFT, Kohya with diffusers or SGM block names, the attention-processor and training-script
  layouts), after `lora_convert`'s rewrite of the formats diffusers does not load, on a state dict of meta
  tensors, so it costs a header read. Keys that the conversion leaves outside every component are keys
  diffusers would silently drop: they are an error here.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodes.engine import lora_convert, lora_dora
from nodes.engine.checkpoints import CheckpointError, read_header

# The "down" (A) matrix of each LoRA layer, in every layout diffusers converts; group 1 is the module.
_DOWN = re.compile(
    r"^(.*?)(?:\.lora_A(?:\.[\w-]+)?\.weight|\.lora_down\.weight|\.lora\.down\.weight|_lora\.down\.weight"
    r"|\.lora_linear_layer\.down\.weight)$"
)
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


class LoraFileError(ValueError):
    """A file that cannot be a LoRA, or one in a format that cannot be loaded exactly."""


@dataclass(frozen=True)
class LoraInfo:
    format: str  # peft (any diffusers/PEFT layout), kohya, kohya-ldm, loha, lokr, locon-tucker (lora_convert)
    ranks: dict[str, int]  # module key (as written in the file) -> rank
    components: frozenset[str]  # unet (the denoiser, a transformer for SD3 and Flux), text_encoder, text_encoder_2
    dora: bool = False  # DoRA magnitudes (lora_magnitude_vector or dora_scale): see lora_dora

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())


def inspect(path: Path) -> LoraInfo:
    try:
        header = read_header(path)
    except CheckpointError as exc:
        raise LoraFileError(str(exc)) from None
    try:
        kind = lora_convert.format_of(list(header.shapes))
        dora = lora_dora.is_dora(list(header.shapes))
        # LyCORIS formats, ldm names, DoRA magnitudes: ranks and modules of the LoRA they are rewritten into
        # (shapes only; a magnitude PEFT cannot use is refused here).
        plain = kind == "peft" or (kind == "kohya" and not dora)
        shapes = header.shapes if plain else {key: tuple(value.shape) for key, value in
                                              lora_convert.convert(_meta(header.shapes)).items()}
    except lora_convert.FormatError as exc:
        raise LoraFileError(f"{path.name}: {exc}") from None
    ranks = {}
    for key, shape in shapes.items():
        match = _DOWN.match(key)
        if match and len(shape) >= 2:
            ranks[match.group(1)] = shape[0]
    if not ranks:
        raise LoraFileError(
            f"{path.name}: no LoRA layers in it (no lora_A/lora_down tensors); is it a checkpoint or an embedding?"
        )
    return LoraInfo(kind, ranks, frozenset(map(_component, ranks)), dora)


def _meta(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    import torch

    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def _component(module: str) -> str:
    if module.startswith(("lora_te2_", "text_encoder_2.", "te2.")):
        return "text_encoder_2"
    if module.startswith(("lora_te_", "lora_te1_", "text_encoder.", "te1.", "te.")):
        return "text_encoder"
    return "unet"


@dataclass(frozen=True)
class Layer:
    """One LoRA layer as PEFT will create it: rank and the base layer's input and output size."""

    rank: int
    in_features: int
    out_features: int
    conv: bool  # a LoCon convolution (4-D A/B matrices)
    dora: bool = False  # with a DoRA magnitude vector


@functools.lru_cache(maxsize=256)
def layers(path: str, fingerprint: str, family: str, unet_config: str = "") -> dict[str, dict[str, Layer]]:
    """component -> PEFT module name -> Layer, as `load_lora_weights` will make them (see the docstring).

    `unet_config` (JSON) lets SDXL Kohya files with SGM block names map like diffusers maps them.
    """
    import torch
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.configuration_utils import FrozenDict
    from safetensors import safe_open

    name = Path(path).name
    state: dict[str, Any] = {}
    with safe_open(path, "pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            shape = handle.get_slice(key).get_shape()
            # Alphas are read (the conversion folds them into per-layer values); the rest need shapes only.
            state[key] = handle.get_tensor(key) if key.endswith(".alpha") else torch.empty(shape, device="meta")
    if family in ("sd3", "flux") and any(key.endswith(".dora_scale") for key in state):
        # diffusers drops these magnitudes (with a warning) in its SD3/Flux conversions; lora_dora maps SD/SDXL's.
        raise LoraFileError(f"{name}: DoRA in Kohya/LyCORIS form (dora_scale) loads on SD1.x and SDXL only, "
                            f"not on {family}")
    if family not in ("sd3", "flux"):  # their Kohya layouts are diffusers' own to convert
        try:
            state = lora_convert.convert(state, unet_config)
        except lora_convert.FormatError as exc:
            raise LoraFileError(f"{name}: {exc}") from None
    kwargs: dict[str, Any] = {}
    if family == "sdxl":
        pipeline: Any = StableDiffusionXLPipeline
        if unet_config:
            kwargs["unet_config"] = FrozenDict(json.loads(unet_config))
    else:
        pipeline = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}.get(family, StableDiffusionPipeline)
    try:
        if family in ("sd3", "flux"):
            converted = pipeline.lora_state_dict(state, **kwargs)
        else:
            converted = lora_dora.lora_state_dict(pipeline, state, **kwargs)[0]
    except lora_dora.DoraError as exc:
        raise LoraFileError(f"{name}: {exc}") from None
    except Exception as exc:  # diffusers raises many types for layouts it does not know
        raise LoraFileError(f"{name}: diffusers cannot convert its keys ({type(exc).__name__}: {exc})") from None
    result: dict[str, dict[str, Layer]] = {}
    for component, peft in peft_parts(converted, name).items():
        found = {}
        for key, down in peft.items():
            module, sep, _ = key.partition(".lora_A")
            if not sep:
                continue
            up = peft.get(f"{module}.lora_B.weight")
            if up is None:
                raise LoraFileError(f"{name}: layer {component}.{module} has a down matrix but no up matrix")
            dora = any(f"{module}.{lora_dora.MAGNITUDE}{end}" in peft for end in ("", ".weight"))
            found[module] = Layer(down.shape[0], down.shape[1], up.shape[0], down.dim() == 4, dora)
        result[component] = found
    return result


def peft_parts(converted: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """diffusers' `lora_state_dict` output by component, in PEFT keys (`<module>.lora_A.weight`), as its loaders
    convert it; components without layers are left out."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    parts: dict[str, dict[str, Any]] = {c: {} for c in COMPONENTS}
    stray = []
    for key, value in converted.items():
        component = next((c for c in COMPONENTS if key.startswith(c + ".")), None)
        if component is None:
            stray.append(key)
        else:
            parts[component][key.removeprefix(component + ".")] = value
    if stray:
        raise LoraFileError(f"{name}: {len(stray)} key(s) in a layout diffusers does not load (e.g. {stray[0]!r}); "
                            "they would be dropped silently")
    result = {}
    for component, part in parts.items():
        if not part:
            continue
        try:
            denoiser = component in ("unet", "transformer")
            result[component] = convert_unet_state_dict_to_peft(part) if denoiser else \
                convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        except ValueError as exc:  # e.g. Kohya text-encoder layers diffusers cannot place
            raise LoraFileError(f"{name}: diffusers cannot convert its {component} keys ({exc})") from None
    return result


def unet_targets(path: str, fingerprint: str, family: str, unet_config: str = "") -> frozenset[str]:
    """The denoiser modules (UNet, or SD3's and Flux's transformer) a LoRA file has layers for, by their names."""
    found = layers(path, fingerprint, family, unet_config)
    return frozenset(found.get("unet") or found.get("transformer") or {})
