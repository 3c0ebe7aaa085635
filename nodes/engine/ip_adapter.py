"""IP-Adapter: image prompts on SD1.x/SDXL UNets, through diffusers' `load_ip_adapter`.

A MODEL recipe records the adapter file, its scale and the image embeddings (`recipe.IPAdapter`); the
embeddings are computed once by IPAdapterApply with a CLIP vision encoder (engine/clip_vision.py) and travel
in the recipe, so the executor caches them as it caches conditioning. The reconciler calls `transition`
after the LoRA transition: it loads the adapter into the UNet (`pipe.load_ip_adapter` from the file's
tensors, `set_ip_adapter_scale`), or unloads it (`unload_ip_adapter`), so a recipe without one runs on the
default attention processors as a fresh pipeline does. `run_sampler` passes the embeddings as
`added_cond_kwargs["image_embeds"]`, and the negative side's: zeros, or for adapters that take hidden states
those of a blank image, as diffusers' pipelines do.

Files: safetensors only, diffusers' single-file layout (`image_proj.*`, `ip_adapter.N.to_k_ip` / `to_v_ip`),
which is also the original IP-Adapter releases' layout. Image projections (`kind`): IP-Adapter (`proj`,
`norm`: takes the projected image embeddings), Plus (a Resampler: `latents`, `proj_in`, `layers.*`) and Full
(`proj.0`…`proj.3`), both taking the encoder's penultimate hidden states. FaceID adapters (they take
insightface face embeddings) are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nodes.engine.recipe import IPAdapter
from nodes.engine.resident import Resident


class IPAdapterError(ValueError):
    """An IP-Adapter or CLIP vision file that cannot be used (not safetensors, wrong layout, another model)."""


def read_adapter(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors as diffusers' `load_ip_adapter` takes them: {"image_proj": …, "ip_adapter": …}."""
    from safetensors.torch import load_file

    from nodes.engine.checkpoints import CheckpointError, require_safetensors

    try:
        require_safetensors(path)
        tensors = load_file(str(path))
    except (CheckpointError, OSError) as exc:
        raise IPAdapterError(f"{path.name}: {exc}") from None
    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in tensors.items():
        group, _, rest = key.partition(".")
        if group in state and rest:
            state[group][rest] = value
    if not state["image_proj"] or not state["ip_adapter"]:
        raise IPAdapterError(f"{path.name}: not an IP-Adapter (expected image_proj.* and ip_adapter.* keys; "
                             f"found {', '.join(sorted(tensors))[:80] or 'none'})")
    kind(state, path.name)
    return state


def kind(state: dict[str, dict[str, torch.Tensor]], name: str) -> str:
    """The adapter's image projection: "embeds" (IP-Adapter: projected image embeddings) or "hidden" (Plus and
    Full: the encoder's penultimate hidden states); FaceID and unknown projections are refused."""
    proj = state["image_proj"]
    faceid = "perceiver_resampler.proj_in.weight" in proj or ("norm.weight" in proj and "proj.0.weight" in proj) \
        or any("_lora." in k for k in state["ip_adapter"])
    if faceid:
        raise IPAdapterError(f"{name}: an IP-Adapter FaceID, which takes insightface face embeddings: not "
                             "supported (IP-Adapter, Plus and Full adapters are)")
    if "proj.weight" in proj and "norm.weight" in proj:
        return "embeds"
    if "proj.3.weight" in proj:
        return "hidden"
    if {"latents", "proj_in.weight", "proj_out.weight", "norm_out.weight"} <= proj.keys():
        depth = {k.split(".")[1] for k in proj if k.startswith("layers.")}
        if depth != {"0", "1", "2", "3"}:  # diffusers builds Plus resamplers 4 blocks deep
            raise IPAdapterError(f"{name}: an IP-Adapter Plus with {len(depth)} resampler blocks; diffusers loads "
                                 "those with 4")
        return "hidden"
    raise IPAdapterError(f"{name}: an unknown IP-Adapter image projection (image_proj keys "
                         f"{', '.join(sorted(proj))[:120]})")


def problem(state: dict[str, dict[str, torch.Tensor]], unet_modules: dict[str, tuple[int, int]],
            name: str) -> str | None:
    """Why an IP-Adapter does not fit a UNet with these Linear layers (module -> (in, out)), or None.

    diffusers numbers the cross-attention layers 1, 3, 5, … in attention-processor order; each `to_k_ip`
    must map the adapter's tokens to that layer's width.
    """
    cross = [m.removesuffix(".to_k") for m in unet_modules if m.endswith("attn2.to_k")]
    ids = sorted({int(k.split(".")[0]) for k in state["ip_adapter"] if k.split(".")[0].isdigit()})
    if len(ids) != len(cross):
        return (f"{name} has IP layers for {len(ids)} cross-attention layers; this model has {len(cross)} "
                "(an IP-Adapter for another model?)")
    for number, layer in zip(ids, cross, strict=True):
        weight = state["ip_adapter"].get(f"{number}.to_k_ip.weight")
        want = unet_modules[f"{layer}.to_k"]
        if weight is None or tuple(weight.shape) != (want[1], want[0]):
            got = "missing" if weight is None else "×".join(map(str, weight.shape))
            return (f"{name}: ip_adapter.{number}.to_k_ip.weight is {got}; the model's {layer} needs "
                    f"{want[1]}×{want[0]} (an IP-Adapter for another model?)")
    return None


def input_problem(state: dict[str, dict[str, torch.Tensor]], vision: dict[str, Any], adapter: str,
                  encoder: str) -> str | None:
    """Why the encoder's output (its CLIPVisionConfig `vision`) does not fit the adapter's projection, or None."""
    proj = state["image_proj"]
    if kind(state, adapter) == "embeds":
        want, have, what = int(proj["proj.weight"].shape[-1]), vision["projection_dim"], "image embeddings"
    else:
        key = "proj_in.weight" if "proj_in.weight" in proj else "proj.0.weight"
        want, have, what = int(proj[key].shape[-1]), vision["hidden_size"], "hidden states"
    if want == have:
        return None
    return f"{encoder} makes {have}-wide {what}; {adapter} takes {want}-wide ones (another image encoder?)"


def transition(resident: Resident, target: IPAdapter | None) -> list[str]:
    """Bring the UNet's IP-Adapter to `target` (None: none); returns the actions taken."""
    have: IPAdapter | None = resident.ip_adapter
    if have is None and target is None:
        return []  # the common case, with no module walk (a failed load is cleared by the reconciler's reset)
    if have is not None and target is not None and have.same_file(target):
        if have.scale == target.scale:
            resident.ip_adapter = target  # new image embeddings only: nothing in the UNet changes
            return []
        resident.pipe.set_ip_adapter_scale(target.scale)
        resident.ip_adapter = target
        return ["ip_adapter_scale"]
    actions = []
    if have is not None:
        unload(resident)
        actions.append("ip_adapter_unload")
    if target is not None:
        from nodes.engine.reconcile import ReconcileError  # here: the reconciler imports this module

        unet = resident.pipe.unet
        try:
            state = read_adapter(Path(target.path))
            state = {group: {k: v.to(unet.device, unet.dtype) for k, v in part.items()}
                     for group, part in state.items()}
            resident.pipe.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None)
            resident.pipe.set_ip_adapter_scale(target.scale)
        except Exception as exc:  # the reconciler resets the UNet (`unload` clears a half-done load)
            raise ReconcileError(f"IP-Adapter {Path(target.path).name!r} cannot be loaded into this model: "
                                 f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        resident.ip_adapter = target
        actions.append("ip_adapter_load")
    return actions


def unload(resident: Resident) -> None:
    """diffusers' `unload_ip_adapter`: the image projection goes, the attention processors are the defaults.

    Also after a load that failed half way (IP attention processors without the image projection, or the reverse).
    """
    unet = resident.pipe.unet
    if getattr(unet, "encoder_hid_proj", None) is not None or any(
            "IPAdapter" in type(processor).__name__ for processor in unet.attn_processors.values()):
        resident.pipe.unload_ip_adapter()
    resident.ip_adapter = None


def to_recipe(embeds: torch.Tensor, negative: torch.Tensor | None) -> dict[str, Any]:
    """Image embeddings (images, width) or hidden states (images, tokens, width), and the negative side's (None:
    zeros), as `recipe.IPAdapter` keeps them: float32 bytes and their shape."""
    def raw(tensor: torch.Tensor) -> bytes:
        return bytes(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())

    return {"embeds": raw(embeds), "shape": tuple(int(n) for n in embeds.shape),
            "negative": b"" if negative is None else raw(negative)}


def embeddings(adapter: IPAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's image embeddings and the negative side's, float32 tensors of its shape."""
    positive = torch.frombuffer(bytearray(adapter.embeds), dtype=torch.float32).view(adapter.shape)
    if not adapter.negative:
        return positive, torch.zeros_like(positive)
    return positive, torch.frombuffer(bytearray(adapter.negative), dtype=torch.float32).view(adapter.shape)
