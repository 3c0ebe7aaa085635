"""Transformer-family checkpoints (SD3, Flux): what their folders and files hold, and the Flux transformer file.

    denoiser_name(pipe)                       -> "unet" or "transformer": the attribute holding the denoiser
    load_flux_transformer_file(path, dtype)   -> a FluxPipeline with that transformer and its scheduler only
    flux_config(path, header)                 -> the FluxTransformer2DModel config, derived from the header

Flux's transformer is usually shared as one file in Black Forest Labs' original key layout (`double_blocks.N.`,
`single_blocks.N.`), with the text encoders and VAE loaded separately (ComfyUI's UNETLoader + DualCLIPLoader +
VAELoader). diffusers converts such files, but with Flux.1's widths hard-coded (inner 3072, MLP 12288), so a
smaller model (our demo, distilled variants) splits wrong; the mapping below is the same one, sized from the
file. The config comes from shapes; the rotary axes, which no tensor records, from Flux.1's convention or the
file's `CONFIG_HINTS_KEY` metadata. Dev and schnell differ by the guidance embedding (`guidance_in.`), which
also picks the scheduler: dev's resolution-dependent shift, schnell's plain schedule.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nodes.engine.checkpoints import (
    CONFIG_HINTS_KEY,
    CheckpointError,
    CorruptCheckpointError,
    SafetensorsHeader,
    UnknownFamilyError,
    read_header,
)

#: The families whose denoiser is `pipe.transformer`; their LoRAs load with `load_lora_into_transformer`.
TRANSFORMER_FAMILIES = ("sd3", "flux")
FLUX_AXES_DEFAULT = (16, 56, 56)  # Flux.1's rotary axes
_PREFIX = "model.diffusion_model."  # files saved from ComfyUI carry it


def denoiser_name(pipe: Any) -> str:
    """Where a pipeline keeps its denoiser: `unet` (SD 1.x/2.x/XL) or `transformer` (SD3, Flux)."""
    return "transformer" if getattr(pipe, "transformer", None) is not None else "unet"


def _linear(original: str, *diffusers: str) -> Iterator[tuple[str, tuple[str, ...]]]:
    for kind in ("weight", "bias"):
        yield f"{original}.{kind}", tuple(f"{d}.{kind}" for d in diffusers)


def _flux_pairs(doubles: int, singles: int, guidance: bool) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(original key, diffusers keys it concatenates) for every tensor of a Flux transformer."""
    embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
    for original, name in embedders + ([("guidance_in", "guidance_embedder")] if guidance else []):
        yield from _linear(f"{original}.in_layer", f"time_text_embed.{name}.linear_1")
        yield from _linear(f"{original}.out_layer", f"time_text_embed.{name}.linear_2")
    yield from _linear("txt_in", "context_embedder")
    yield from _linear("img_in", "x_embedder")
    for i in range(doubles):
        o, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        yield from _linear(o + "img_mod.lin", d + "norm1.linear")
        yield from _linear(o + "txt_mod.lin", d + "norm1_context.linear")
        yield from _linear(o + "img_attn.qkv", d + "attn.to_q", d + "attn.to_k", d + "attn.to_v")
        yield from _linear(o + "txt_attn.qkv", d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj")
        for side, added in (("img", ""), ("txt", "added_")):
            yield o + f"{side}_attn.norm.query_norm.scale", (d + f"attn.norm_{added}q.weight",)
            yield o + f"{side}_attn.norm.key_norm.scale", (d + f"attn.norm_{added}k.weight",)
        for side, ff in (("img", "ff"), ("txt", "ff_context")):
            yield from _linear(o + f"{side}_mlp.0", d + f"{ff}.net.0.proj")
            yield from _linear(o + f"{side}_mlp.2", d + f"{ff}.net.2")
        yield from _linear(o + "img_attn.proj", d + "attn.to_out.0")
        yield from _linear(o + "txt_attn.proj", d + "attn.to_add_out")
    for i in range(singles):
        o, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        yield from _linear(o + "modulation.lin", d + "norm.linear")
        yield from _linear(o + "linear1", d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp")
        yield o + "norm.query_norm.scale", (d + "attn.norm_q.weight",)
        yield o + "norm.key_norm.scale", (d + "attn.norm_k.weight",)
        yield from _linear(o + "linear2", d + "proj_out")
    yield from _linear("final_layer.linear", "proj_out")
    # The final modulation is (shift, scale) in the original and (scale, shift) in diffusers: see _swap.
    yield from _linear("final_layer.adaLN_modulation.1", "norm_out.linear")


def _swap(tensor: Any) -> Any:
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _counts(keys: Any, prefix: str) -> int:
    return len({int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)})


def flux_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """A diffusers Flux transformer state dict (weights and/or biases) in the original layout."""
    import torch

    doubles, singles = _counts(state, "transformer_blocks."), _counts(state, "single_transformer_blocks.")
    guidance = any(k.startswith("time_text_embed.guidance_embedder.") for k in state)
    out = {}
    for original, names in _flux_pairs(doubles, singles, guidance):
        if all(n in state for n in names):
            tensor = torch.cat([state[n] for n in names]) if len(names) > 1 else state[names[0]]
            out[original] = _swap(tensor) if original.startswith("final_layer.adaLN") else tensor
    return out


def flux_from_original(path: Path, state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The original-layout tensors of a Flux transformer file as a diffusers state dict; refuses any leftover."""
    state = {k.removeprefix(_PREFIX): v for k, v in state.items()}
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    out: dict[str, Any] = {}
    for original, names in _flux_pairs(config["num_layers"], config["num_single_layers"], config["guidance_embeds"]):
        tensor = state.pop(original, None)
        if tensor is None:
            raise UnknownFamilyError(path, f"expected tensor '{original}' is missing: not a Flux transformer")
        if original.startswith("final_layer.adaLN"):
            tensor = _swap(tensor)
        if len(names) == 1:
            out[names[0]] = tensor
            continue
        sizes = [inner] * len(names)
        sizes[-1] = tensor.shape[0] - inner * (len(names) - 1)  # linear1's last part is the MLP
        out.update(zip(names, tensor.split(sizes), strict=True))
    if state:
        raise UnknownFamilyError(path, f"{len(state)} tensor(s) of no Flux transformer layer, "
                                       f"e.g. {next(iter(state))!r}")
    return out


def flux_config(path: Path, header: SafetensorsHeader) -> dict[str, Any]:
    """The diffusers config of a Flux transformer file, from its shapes (plus the rotary axes)."""
    shapes = {k.removeprefix(_PREFIX): v for k, v in header.shapes.items()}

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise UnknownFamilyError(path, f"expected tensor '{key}' is missing: not a Flux transformer")
        return shapes[key]

    inner, in_channels = shape("img_in.weight")
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    axes = list(FLUX_AXES_DEFAULT)
    raw = header.metadata.get(CONFIG_HINTS_KEY)
    if raw:
        try:
            axes = list(json.loads(raw).get("transformer", {}).get("axes_dims_rope", axes))
        except (json.JSONDecodeError, AttributeError):
            raise CorruptCheckpointError(path, f"metadata '{CONFIG_HINTS_KEY}' is not a JSON object") from None
    out_channels = shape("final_layer.linear.weight")[0]
    if sum(axes) != head_dim:
        raise UnknownFamilyError(path, f"rotary axes {axes} do not add up to the head width {head_dim}")
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": None if out_channels == in_channels else out_channels,  # None: as many as in
        "num_layers": _counts(shapes, "double_blocks."),
        "num_single_layers": _counts(shapes, "single_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": shape("txt_in.weight")[1],
        "pooled_projection_dim": shape("vector_in.in_layer.weight")[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        "axes_dims_rope": axes,
    }


def flux_scheduler_config(guidance_embeds: bool) -> dict[str, Any]:
    """dev (guidance-distilled): resolution-dependent shift; schnell: the plain schedule."""
    from nodes.engine.demo_transformers import FLUX_SCHEDULER, FLUX_SCHNELL_SCHEDULER

    return dict(FLUX_SCHEDULER if guidance_embeds else FLUX_SCHNELL_SCHEDULER)


def is_transformer_file(path: Path) -> bool:
    """A single file holding only a Flux transformer (what UNETLoader loads)."""
    shapes = read_header(path).shapes
    return any(k.removeprefix(_PREFIX).startswith("double_blocks.") for k in shapes) and not any(
        k.startswith(("first_stage_model.", "vae.", "text_encoders.", "conditioner.")) for k in shapes)


def load_transformer_file(path: Path, family: str, dtype: Any) -> Any:
    """The pipeline of a transformer-only single file: Flux's; SD3 files are not read yet."""
    if family != "flux" or not is_transformer_file(path):
        raise UnknownFamilyError(path, f"{family} single files with text encoders or VAE are not supported yet; use "
                                       "a diffusers folder (or a Flux transformer-only file with UNETLoader)")
    return load_flux_transformer_file(path, dtype)


def load_flux_transformer_file(path: Path, dtype: Any) -> Any:
    """A FluxPipeline holding the file's transformer and the matching scheduler, nothing else.

    The weights are memory-mapped and assigned to a transformer built on the meta device (no random init).
    """
    from accelerate import init_empty_weights
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from safetensors.torch import load_file

    header = read_header(path)
    config = flux_config(path, header)
    with init_empty_weights():
        transformer = FluxTransformer2DModel(**config)
    state = flux_from_original(path, load_file(str(path)), config)
    try:
        transformer.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(path, f"the weights do not fit the derived Flux config: {exc}") from None
    transformer.eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**flux_scheduler_config(config["guidance_embeds"]))
    return FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,  # type: ignore[arg-type]
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
