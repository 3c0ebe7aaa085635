"""LoRA formats diffusers cannot load, rewritten exactly as a Kohya LoRA state dict that it loads.

`convert(state, unet_config)` returns the state dict unchanged when diffusers loads it as it is, else a
Kohya-layout dict (`lora_unet_<diffusers module>.lora_down/.lora_up`, alphas folded into `up`) whose
ΔW = up @ down equals the format's own ΔW for every layer, so the reconciler's load path (diffusers' converters, PEFT's
LoRA layers, strengths, fuse) works on it unchanged. It runs on meta tensors too (shapes only), which is how
`lora_files` learns the layers and ranks before anything loads. The result is a pure function of the file
and the UNet config: a cache may keep it.

Formats and the exact rewrite (ΔW as LyCORIS and kohya define it; `scale` is alpha / dim):
- Kohya LoRA/LoCon: names kept, alpha / rank folded into `up` (so alphas that differ per layer load exactly).
- ldm/SGM block names (`lora_unet_input_blocks_4_1_…`, ComfyUI's `diffusion_model.…`): renamed to the
  diffusers modules, found by mapping every module of the checkpoint's UNet to its ldm name.
- LoHa: ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha / r1. A Hadamard product of rank-r1 and rank-r2 products is
  a rank r1·r2 product: up = row-wise Khatri–Rao of w1a, w2a; down = column-wise Khatri–Rao of w1b, w2b.
- LoKr: ΔW = kron(w1, w2) · scale, w1 = w1a @ w1b or full, w2 = w2a @ w2b or full (a convolution kernel
  only in w2). With w1 = A1 A2 and w2 = B1 B2, kron(w1, w2) = kron(A1, B1) · kron(A2, B2): up and down.
  A full factor is split as (itself, I) or (I, itself), whichever gives the smaller rank.
- LoCon with Tucker (`lora_mid`): a 1×1 down, a k×k mid and a 1×1 up; mid ∘ down is one k×k convolution.
- LoHa with Tucker (`hada_t1`, `hada_t2`, k×k convolutions): each factor is W_n = t_n ×1 a_n ×2 b_n
  (t_n (r_n, r_n, k, k), a_n (r_n, out), b_n (r_n, in)). Their Hadamard product is a Tucker tensor of rank
  r1·r2 (core: the product of the cores over both rank modes), which is a LoCon-Tucker layer; with its core
  folded into down: up = row-wise Khatri–Rao of a1ᵀ, a2ᵀ, down[(i, i')] = (t1 ×2 b1)[i] ⊙ (t2 ×2 b2)[i'].
- LoKr with Tucker (`lokr_t2`): w2 = t2 ×1 w2_a ×2 w2_b = (w2_aᵀ) ∘ (t2 ×2 w2_b), a rank-r factor pair.
- DoRA (`dora_scale`, on any of these): the magnitude is kept beside the layer, in PEFT's shape
  (`lora_dora.magnitude`); `lora_dora.lora_state_dict` names it for PEFT's DoRA layers.
"""

from __future__ import annotations

import functools
import json
import re
from typing import TYPE_CHECKING, Any

from nodes.engine import lora_dora

if TYPE_CHECKING:  # torch is imported where it is used: node modules import this one, and the CLI starts fast
    from torch import Tensor

_LYCORIS = (".hada_w1_a", ".lokr_w1", ".lokr_w2", ".lora_mid.")
_COMFY = re.compile(r"^diffusion_model\.(.+?)\.((?:lora_|hada_|lokr_|alpha|dora_).*)$")
_LDM = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_")


class FormatError(ValueError):
    """A file in a format that cannot be rewritten exactly."""


def format_of(keys: list[str]) -> str:
    """The file's format, from its key names: peft, kohya, kohya-ldm, loha, lokr or locon-tucker."""
    if any(".hada_w1_a" in k for k in keys):
        return "loha"
    if any(".lokr_w1" in k or ".lokr_w2" in k for k in keys):
        return "lokr"
    if any(".lora_mid." in k for k in keys):
        return "locon-tucker"
    if any(k.startswith("diffusion_model.") or _LDM.match(k) for k in keys):
        return "kohya-ldm"
    return "kohya" if any(".lora_down." in k for k in keys) else "peft"


def needs_conversion(keys: list[str]) -> bool:
    """Every Kohya-layout file is rewritten: diffusers loads one whose alphas differ between attention
    layers inexactly (its alpha_pattern names modules PEFT never matches)."""
    return format_of(keys) != "peft"


def convert(state: dict[str, Tensor], unet_config: str = "") -> dict[str, Tensor]:
    """The state dict as diffusers loads it exactly (see the module docstring); `state` itself if it already is.

    `unet_config` (JSON) is needed for ldm names and for LyCORIS convolutions (their kernel size is the
    model's); without it, such layers keep flat 2-D down matrices (enough for ranks, not for loading).
    """
    keys = list(state)
    if not needs_conversion(keys):
        return state
    modules = _unet_modules(unet_config) if unet_config else {}
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        comfy = _COMFY.match(key)
        if comfy:  # ComfyUI: the ldm module path with dots
            suffix = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}.get(comfy[2], comfy[2])
            key = f"lora_unet_{comfy[1].replace('.', '_')}.{suffix}"
        module, sep, suffix = key.partition(".")
        if not module.startswith("lora_") or not sep:
            raise FormatError(f"key {key!r} is not in the Kohya/LyCORIS layout the rest of the file uses")
        groups.setdefault(module, {})[suffix] = value
    out: dict[str, Tensor] = {}
    for module, parts in groups.items():
        # A layer this UNet lacks keeps its name (and a conv's flat factors): lora_match names it as not fitting.
        name, shape = _resolve(module, modules)
        try:
            down, up, scale = _as_lora(module, parts, shape)
        except KeyError as exc:
            raise FormatError(f"layer {module!r} has no {exc.args[0]} (it has {', '.join(sorted(parts))})") from None
        except RuntimeError as exc:  # factors whose shapes do not multiply
            raise FormatError(f"layer {module!r} has matrices of inconsistent shapes ({exc})") from None
        if "dora_scale" in parts:
            try:
                out[f"{name}.dora_scale"] = lora_dora.magnitude(module, parts["dora_scale"], down, up)
            except lora_dora.DoraError as exc:
                raise FormatError(str(exc)) from None
        out[f"{name}.lora_down.weight"] = down
        # The scale goes into `up`, and no layer gets an alpha: diffusers then gives every layer scale 1,
        # whatever its rank (its alpha_pattern for Kohya attention layers is keyed by names PEFT never matches).
        out[f"{name}.lora_up.weight"] = up if scale is None or up.is_meta else up.float() * scale
    return out


def _resolve(module: str, modules: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[str, tuple[int, ...] | None]:
    """A Kohya module name in diffusers naming, and its weight shape in the UNet (None if unknown)."""
    if not module.startswith("lora_unet_"):
        return module, None
    return modules.get(module, (module, None))


def _as_lora(module: str, parts: dict[str, Tensor],
             shape: tuple[int, ...] | None) -> tuple[Tensor, Tensor, float | None]:
    """(down, up, scale) with scale · up @ down = the layer's ΔW; scale None: 1 (no alpha)."""
    import torch

    alpha = parts.get("alpha")
    alpha_value = None if alpha is None or alpha.is_meta else float(alpha)
    if "lora_down.weight" in parts and "lora_mid.weight" not in parts:
        return parts["lora_down.weight"], parts["lora_up.weight"], None if alpha is None else _rank_scale(
            alpha_value, parts["lora_down.weight"].shape[0])
    if "lora_mid.weight" in parts:
        down, mid, up = (parts[f"lora_{p}.weight"].float() for p in ("down", "mid", "up"))
        merged = torch.einsum("ijkl,jr->irkl", mid, down.flatten(1))
        return merged, up, _rank_scale(alpha_value, down.shape[0])
    if "hada_t1" in parts:
        return _loha_tucker(parts, alpha_value)
    if "hada_w1_a" in parts:
        w1a, w1b, w2a, w2b = (parts[f"hada_{p}"].float() for p in ("w1_a", "w1_b", "w2_a", "w2_b"))
        rank = w1a.shape[1] * w2a.shape[1]
        up = torch.einsum("oa,ob->oab", w1a, w2a).reshape(w1a.shape[0], rank)
        down = torch.einsum("ai,bi->abi", w1b.flatten(1), w2b.flatten(1)).reshape(rank, -1)
        return _conv(down, up, shape), _conv_up(up, shape), _fixed(alpha_value, w1b.shape[0])
    if any(k.startswith("lokr_") for k in parts):
        return _lokr(module, parts, alpha_value, shape)
    raise FormatError(f"layer {module!r} has no LoRA, LoHa or LoKr matrices ({', '.join(sorted(parts))})")


def _lokr(module: str, parts: dict[str, Tensor], alpha: float | None,
          shape: tuple[int, ...] | None) -> tuple[Tensor, Tensor, float | None]:
    import torch

    def factors(n: str) -> tuple[Tensor, Tensor] | None:
        if f"lokr_{n}_a" in parts:
            return parts[f"lokr_{n}_a"].float(), parts[f"lokr_{n}_b"].float()
        return None

    w1, w2 = factors("w1"), factors("w2")
    if "lokr_t2" in parts:  # w2 = t2 ×1 w2_a ×2 w2_b, w2_a (r, c) and w2_b (r, d): up w2_aᵀ, down t2 ×2 w2_b
        t2, w2_a, w2_b = parts["lokr_t2"].float(), parts["lokr_w2_a"].float(), parts["lokr_w2_b"].float()
        w2 = (w2_a.T.contiguous(), torch.einsum("ijhw,jq->iqhw", t2, w2_b).contiguous())
    if w1 is None:
        full = parts["lokr_w1"].float()
        eye_a, eye_b = torch.eye(full.shape[0], device=full.device), torch.eye(full.shape[1], device=full.device)
        w1 = (full, eye_b) if full.shape[1] <= full.shape[0] else (eye_a, full)
    if w2 is None:
        full = parts["lokr_w2"].float()
        if shape is not None and len(shape) == 4 and full.dim() == 2:
            full = full.reshape(full.shape[0], -1, *shape[2:])
        eye_c = torch.eye(full.shape[0], device=full.device)
        if full.dim() == 2 and full.shape[1] < full.shape[0]:
            w2 = (full, torch.eye(full.shape[1], device=full.device))
        else:
            w2 = (eye_c, full)
    (a1, a2), (b1, b2) = w1, w2
    up = torch.kron(a1, b1)
    if shape is not None and len(shape) == 4 and b2.dim() == 2:
        b2 = b2.reshape(b2.shape[0], -1, *shape[2:])  # LyCORIS stores a conv w2_b flat: (r, in · k · k)
    if b2.dim() == 4:
        down = torch.kron(a2[:, :, None, None], b2)
    else:
        down = torch.kron(a2, b2)
        down = _conv(down, up, shape)
    dim = parts["lokr_w2_b"].shape[0] if "lokr_w2_b" in parts else \
        parts["lokr_w1_b"].shape[0] if "lokr_w1_b" in parts else None
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return down, _conv_up(up, shape), scale


def _loha_tucker(parts: dict[str, Tensor], alpha: float | None) -> tuple[Tensor, Tensor, float]:
    """A Tucker LoHa convolution as one LoRA convolution of rank r1·r2 (see the module docstring)."""
    import torch

    t1, a1, b1, t2, a2, b2 = (parts[f"hada_{p}"].float() for p in ("t1", "w1_a", "w1_b", "t2", "w2_a", "w2_b"))
    rank = a1.shape[0] * a2.shape[0]
    folded1, folded2 = torch.einsum("ijhw,jq->iqhw", t1, b1), torch.einsum("ijhw,jq->iqhw", t2, b2)
    down = torch.einsum("iqhw,jqhw->ijqhw", folded1, folded2).reshape(rank, *folded1.shape[1:])
    up = torch.einsum("ip,jp->pij", a1, a2).reshape(a1.shape[1], rank, 1, 1)
    return down, up, _fixed(alpha, b1.shape[0])


def _rank_scale(alpha: float | None, rank: int) -> float | None:
    return None if alpha is None else alpha / rank


def _fixed(alpha: float | None, dim: int) -> float:
    return 1.0 if alpha is None else alpha / dim


def _conv(down: Tensor, up: Tensor, shape: tuple[int, ...] | None) -> Tensor:
    """A flat down matrix as the convolution it is, for a conv layer of this weight shape."""
    if shape is None or len(shape) != 4 or down.dim() == 4:
        return down
    return down.reshape(down.shape[0], shape[1], *shape[2:])


def _conv_up(up: Tensor, shape: tuple[int, ...] | None) -> Tensor:
    return up[:, :, None, None] if shape is not None and len(shape) == 4 else up


@functools.lru_cache(maxsize=8)
def _unet_modules(unet_config: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Kohya name (diffusers or ldm block naming) -> (Kohya name in diffusers naming, weight shape)."""
    import torch
    from diffusers import UNet2DConditionModel

    from nodes.engine.demo_models import unet_key_to_ldm

    config: dict[str, Any] = json.loads(unet_config)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    layers = config["layers_per_block"]
    up_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            kohya = "lora_unet_" + name.replace(".", "_")
            entry = (kohya, tuple(module.weight.shape))
            found[kohya] = entry
            try:
                ldm = unet_key_to_ldm(f"{name}.weight", layers, up_attention).removesuffix(".weight")
            except ValueError:
                continue  # a module the ldm layout has no name for
            found["lora_unet_" + ldm.replace(".", "_")] = entry
    return found


def load_source(path: str, unet_config: str) -> str | dict[str, Tensor]:
    """What diffusers' `lora_state_dict` should read for this file: its path, or its tensors rewritten."""
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        keys = list(handle.keys())
        if not needs_conversion(keys):
            return path
        state = {key: handle.get_tensor(key) for key in keys}
    return convert(state, unet_config)
