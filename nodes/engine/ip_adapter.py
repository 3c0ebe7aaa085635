"""IP-Adapter: image prompts on SD1.x/SDXL UNets, through diffusers' `load_ip_adapter`.

A MODEL recipe records the adapter file, its scale and the image embeddings (`recipe.IPAdapter`); the
embeddings are computed once by ApplyIPAdapter with a CLIP vision encoder (`encode`) and travel in the
recipe, so the executor caches them as it caches conditioning. The reconciler calls `transition` after
the LoRA transition: it loads the adapter into the UNet (`pipe.load_ip_adapter` from the file's tensors,
`set_ip_adapter_scale`), or unloads it (`unload_ip_adapter`), so a recipe without one runs on the
default attention processors as a fresh pipeline does. `run_sampler` passes the embeddings as
`added_cond_kwargs["image_embeds"]`, zeros for the negative side (as diffusers' pipeline does).

Files: safetensors only. An IP-Adapter is diffusers' single-file layout (`image_proj.*`, `ip_adapter.N.to_k_ip`
/ `to_v_ip`); a CLIP vision encoder is a `.safetensors` of CLIPVisionModelWithProjection's weights with its
config as JSON in the metadata (`clip_vision_config`) or in a config.json beside it (a transformers folder).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from nodes.engine.recipe import IPAdapter
from nodes.engine.resident import Resident

CONFIG_KEY = "clip_vision_config"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the OpenAI CLIP normalization CLIPImageProcessor uses
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
    return state


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


def image_embed_dim(state: dict[str, dict[str, torch.Tensor]]) -> int | None:
    """The width of the image embeddings the adapter's projection takes (None for layouts not checked here)."""
    for key in ("proj.weight", "proj.0.weight"):  # IP-Adapter, IP-Adapter full
        if key in state["image_proj"]:
            return int(state["image_proj"][key].shape[-1])
    return None


@functools.lru_cache(maxsize=2)
def load_clip_vision(path: str, fingerprint: str) -> Any:
    """CLIPVisionModelWithProjection in float32 on the CPU, eval mode (kept for the next images)."""
    from safetensors import safe_open
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from nodes.engine.checkpoints import CheckpointError, require_safetensors

    where = Path(path)
    try:
        require_safetensors(where)
        with safe_open(str(where), framework="pt") as f:
            config = (f.metadata() or {}).get(CONFIG_KEY)
            beside = where.parent / "config.json"  # a transformers folder's model.safetensors
            if config is None and beside.is_file():
                config = beside.read_text(encoding="utf-8")
            if config is None:
                raise IPAdapterError(f"{where.name}: no {CONFIG_KEY} in its metadata and no config.json beside it "
                                     "(the CLIP vision model's configuration is needed)")
            settings = {k: v for k, v in json.loads(config).items() if k != "vision_config"}
            settings.update(json.loads(config).get("vision_config") or {})
            model = CLIPVisionModelWithProjection(CLIPVisionConfig(**settings))
            missing, unexpected = model.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, strict=False)
        if missing or unexpected:
            raise IPAdapterError(f"{where.name}: not a CLIP vision model's weights "
                                 f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
    except IPAdapterError:
        raise
    except (CheckpointError, OSError, ValueError, TypeError, RuntimeError) as exc:
        raise IPAdapterError(f"{where.name}: {exc}") from None
    return model.float().eval()


def preprocess(image: torch.Tensor, size: int) -> torch.Tensor:
    """IMAGE (batch, H, W, 3) in 0..1 to CLIP's pixels: shortest side to `size` (bicubic), centre crop, normalize."""
    x = image.movedim(-1, 1).float()
    height, width = x.shape[-2:]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        new = (max(size, round(height * scale)), max(size, round(width * scale)))
        x = torch.nn.functional.interpolate(x, size=new, mode="bicubic", antialias=True).clamp(0, 1)
        top, left = (new[0] - size) // 2, (new[1] - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def encode(model: Any, image: torch.Tensor) -> torch.Tensor:
    """The image embeddings (batch, projection dim), float32: what the adapter's image projection takes."""
    with torch.inference_mode():
        pixels = preprocess(image[..., :3], model.config.image_size)
        return model(pixel_values=pixels).image_embeds.float().clone()


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


def to_recipe_bytes(embeds: torch.Tensor) -> tuple[bytes, tuple[int, int]]:
    """Image embeddings (images, width) as the recipe keeps them: float32 bytes and their shape."""
    flat = embeds.detach().to("cpu", torch.float32).contiguous()
    return flat.numpy().tobytes(), (int(flat.shape[0]), int(flat.shape[1]))


def embeddings(adapter: IPAdapter) -> torch.Tensor:
    """The recipe's image embeddings as a float32 tensor (images, width)."""
    return torch.frombuffer(bytearray(adapter.embeds), dtype=torch.float32).view(adapter.shape)
