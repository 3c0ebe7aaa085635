"""DoRA files, loaded exactly with PEFT's DoRA layers (`use_dora`).

DoRA (weight-decomposed LoRA) adds a magnitude vector m, one number per output channel, to a LoRA:
    W' = m · (W + s·ΔW) / ||W + s·ΔW||      (the norm of each output channel's row: over the input channels
                                              and, for a convolution, its kernel)
with ΔW = up @ down and s the LoRA's scaling. PEFT stores m as `lora_magnitude_vector` (shape (out,) for a
Linear layer, (1, out, 1, 1) for a convolution) and applies this in its forward (and in `fuse_lora`).

Two file layouts, one result:
- PEFT/diffusers files (`<module>.lora_magnitude_vector`, as the diffusers and PEFT training scripts save
  them) load as they are, except that transformers drops a text encoder's magnitudes unless the key ends
  in `.weight` (it renames `lora_*` keys by appending the adapter name, then finds no parameter): they are
  renamed here (`lora_state_dict`).
- Kohya/LyCORIS files (`<module>.dora_scale`, LoRA, LoHa or LoKr): `lora_convert` rewrites the LoRA part as
  a Kohya LoRA and keeps the magnitude in PEFT's shape (`magnitude`), then `lora_state_dict` renames every
  layer to PEFT's keys (diffusers itself drops `dora_scale` with a warning). LyCORIS's default
  (`wd_on_output`) normalises each output channel, as PEFT does: m is the same vector. Its other mode (older
  LyCORIS files: a (1, in) `dora_scale`, one number per input channel) is a different function of W, which
  PEFT cannot compute: such a file is refused by name.

Strength: PEFT's scaling s (alpha/rank × the LoRA's strength) scales ΔW *inside* the normalisation, so at
strength w a layer is m · (W + w·ΔW) / ||W + w·ΔW||; at strength 0 it is m · W / ||W||, not W. LyCORIS and
ComfyUI instead interpolate between W and the strength-1 result. Both agree at strength 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

MAGNITUDE = "lora_magnitude_vector"


class DoraError(ValueError):
    """A DoRA magnitude PEFT cannot use as it is."""


def is_dora(keys: list[str]) -> bool:
    return any(k.endswith((".dora_scale", f".{MAGNITUDE}", f".{MAGNITUDE}.weight")) for k in keys)


def magnitude(module: str, scale: Tensor, down: Tensor, up: Tensor) -> Tensor:
    """A LyCORIS `dora_scale` as PEFT's magnitude vector, for the layer whose LoRA is up @ down.

    LyCORIS's shape says its axis: (out, 1[, 1, 1]) per output channel, (1, in[, 1, 1]) per input channel.
    """
    out, conv = up.shape[0], down.dim() == 4 or scale.dim() == 4
    if scale.numel() == out and scale.shape[0] == out:
        return scale.reshape(1, out, 1, 1) if conv else scale.reshape(out)
    if scale.dim() >= 2 and scale.shape[0] == 1:
        raise DoraError(f"layer {module!r}: DoRA with the weight norm over input channels (dora_scale of shape "
                        f"{tuple(scale.shape)}, LyCORIS without wd_on_output) is not supported: PEFT's DoRA "
                        "normalises output channels")
    raise DoraError(f"layer {module!r}: dora_scale of shape {tuple(scale.shape)} fits neither the output "
                    f"({out}) nor the input channels of its LoRA")


def lora_state_dict(pipeline: Any, tensors: dict[str, Any], **kwargs: Any) -> tuple[dict[str, Any], Any]:
    """`pipeline.lora_state_dict(tensors, **kwargs)` (state, network alphas), with DoRA magnitudes kept.

    `tensors`: a state dict as `lora_convert.convert` leaves it (Kohya layers with `.dora_scale` already in
    PEFT's shape), or a PEFT/diffusers file's.
    """
    if any(k.endswith(".dora_scale") for k in tensors):
        tensors = _kohya_to_peft(pipeline, tensors, **kwargs)
    state, alphas = pipeline.lora_state_dict(tensors, **kwargs)
    return {_named_for_loading(k): v for k, v in state.items()}, alphas


def _named_for_loading(key: str) -> str:
    # Only the text encoders' loader (transformers) needs the `.weight`; PEFT's own loader (the denoiser's)
    # takes both.
    return key + ".weight" if key.startswith("text_encoder") and key.endswith(f".{MAGNITUDE}") else key


def _kohya_to_peft(pipeline: Any, tensors: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """A Kohya state dict with magnitudes in PEFT's keys: `<component>.<module>.lora_A.weight`, `.lora_B.weight`
    and `.lora_magnitude_vector`, module names as diffusers' own Kohya conversion makes them (found by the
    identity of each layer's down tensor, which the conversion moves without copying)."""
    from nodes.engine.lora_files import peft_parts

    scales = {k.removesuffix(".dora_scale"): v for k, v in tensors.items() if k.endswith(".dora_scale")}
    plain = {k: v for k, v in tensors.items() if not k.endswith(".dora_scale")}
    downs = {id(plain[f"{module}.lora_down.weight"]): module for module in scales if f"{module}.lora_down.weight"
             in plain}
    converted, _ = pipeline.lora_state_dict(dict(plain), **kwargs)
    out: dict[str, Any] = {}
    for component, part in peft_parts(converted, "").items():
        for key, value in part.items():
            out[f"{component}.{key}"] = value
            module, sep, _ = key.partition(".lora_A.weight")
            if sep and id(value) in downs:
                out[f"{component}.{module}.{MAGNITUDE}"] = scales.pop(downs[id(value)])
    if scales:  # a magnitude whose layer has no LoRA, or whose down tensor the conversion copied
        raise DoraError(f"dora_scale of layer {next(iter(scales))!r} belongs to no LoRA layer of the file")
    return out
