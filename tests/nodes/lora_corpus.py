"""A corpus of LoRA files in every format LoadLoRA accepts, for the tiny SD1.5 model, written by the tests.

Each writer returns the file and the ΔW every layer must get, computed here from the written tensors with
the format's own definition (LyCORIS / kohya: LoHa (w1a w1b) ⊙ (w2a w2b) · alpha / r1, LoKr kron(w1, w2) ·
alpha / dim, LoCon Tucker up ∘ mid ∘ down · alpha / r, LoRA up @ down · alpha / r), independently of
`nodes.engine.lora_convert`. Keys: (component, module name in the diffusers model).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nodes.engine.demo_models import unet_key_to_ldm

Delta = dict[tuple[str, str], torch.Tensor]

LINEAR = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # 32 -> 64
SQUARE = "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"  # 64 -> 64
CONV3 = "down_blocks.1.resnets.0.conv1"  # 32 -> 64, 3×3
CONV1 = "down_blocks.1.attentions.0.proj_in"  # 64 -> 64, 1×1
UPSAMPLER = "up_blocks.0.upsamplers.0.conv"  # 64 -> 64, 3×3
# Kohya text-encoder files cover all four projections (diffusers cannot read a file with q_proj alone).
TEXT = tuple(f"text_model.encoder.layers.0.self_attn.{p}_proj" for p in ("q", "k", "v", "out"))  # 32 -> 32
SHAPES = {LINEAR: (64, 32), SQUARE: (64, 64), CONV3: (64, 32, 3, 3), CONV1: (64, 64, 1, 1),
          UPSAMPLER: (64, 64, 3, 3), **{t: (32, 32) for t in TEXT}}
UNET = (LINEAR, SQUARE, CONV3, CONV1, UPSAMPLER)


def _gen(seed: int) -> Callable[..., torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=generator) * 0.2


def kohya_name(module: str, component: str = "unet") -> str:
    return ("lora_unet_" if component == "unet" else "lora_te_") + module.replace(".", "_")


def ldm_name(module: str) -> str:
    ldm = unet_key_to_ldm(module + ".weight", 2, [True, False]).removesuffix(".weight")
    return "lora_unet_" + ldm.replace(".", "_")


def _targets(text: bool = True) -> list[tuple[str, str]]:
    return [("unet", m) for m in UNET] + ([("text_encoder", t) for t in TEXT] if text else [])


def lora(out: Path, seed: int = 1, rank: int = 4, alpha: float = 2.0, names: str = "diffusers",
         dtype: torch.dtype = torch.float32, alpha_step: float = 0.0, text: bool = True) -> tuple[Path, Delta]:
    """Kohya LoRA/LoCon (conv layers included); `names`: diffusers, ldm (lora_unet_input_blocks_…) or comfy.
    `alpha_step`: each layer's alpha is that much above the previous one's."""
    randn, tensors, delta = _gen(seed), {}, {}
    for i, (component, module) in enumerate(_targets(text)):
        alpha_here = alpha + i * alpha_step
        shape = SHAPES[module]
        down = randn(rank, *shape[1:]).to(dtype)
        up = randn(shape[0], rank, *([1, 1] if len(shape) == 4 else [])).to(dtype)
        if component == "unet" and names == "comfy":
            ldm = ldm_name(module).removeprefix("lora_unet_")
            name = "diffusion_model." + unet_key_to_ldm(module + ".weight", 2, [True, False]).removesuffix(".weight")
            assert name.replace(".", "_").endswith(ldm)
        elif component == "unet" and names == "ldm":
            name = ldm_name(module)
        else:
            name = kohya_name(module, component)
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        tensors[f"{name}.alpha"] = torch.tensor(alpha_here)
        product = up.float().flatten(1) @ down.float().flatten(1)
        delta[(component, module)] = product.reshape(shape) * alpha_here / rank
    save_file(tensors, out, metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                                      "ss_output_name": "corpus"})
    return out, delta


def locon_tucker(out: Path, seed: int = 2, rank: int = 3, alpha: float = 1.5, text: bool = True
                 ) -> tuple[Path, Delta]:
    """LyCORIS LoCon with Tucker decomposition on the 3×3 convolutions, plain LoRA on the rest."""
    randn, tensors, delta = _gen(seed), {}, {}
    for component, module in _targets(text):
        shape, name = SHAPES[module], kohya_name(module, component)
        if len(shape) == 4 and shape[2] == 3:
            down, mid, up = randn(rank, shape[1], 1, 1), randn(rank, rank, 3, 3), randn(shape[0], rank, 1, 1)
            tensors[f"{name}.lora_mid.weight"] = mid
            full = torch.einsum("ijkl,jr,pi->prkl", mid, down.flatten(1), up.flatten(1))
        else:
            down, up = randn(rank, *shape[1:]), randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []))
            full = (up.flatten(1) @ down.flatten(1)).reshape(shape)
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
        delta[(component, module)] = full * alpha / rank
    save_file(tensors, out)
    return out, delta


def loha(out: Path, seed: int = 3, r1: int = 3, r2: int = 2, alpha: float = 2.0,
         dtype: torch.dtype = torch.float32, tucker: bool = False) -> tuple[Path, Delta]:
    """LyCORIS LoHa; convolutions store w1_b and w2_b flat, (rank, in · k · k), as LyCORIS does. `tucker`: the
    k×k convolutions as LyCORIS's use_tucker stores them, each factor t[i, j, kh, kw] with w_a (r, out) and
    w_b (r, in): W = einsum("i j h w, j q, i p -> p q h w", t, w_b, w_a)."""
    randn, tensors, delta = _gen(seed), {}, {}
    for component, module in _targets():
        shape, name = SHAPES[module], kohya_name(module, component)
        if tucker and len(shape) == 4 and shape[2] > 1:
            rebuilt = []
            for i, r in ((1, r1), (2, r2)):
                t, wa, wb = randn(r, r, *shape[2:]), randn(r, shape[0]), randn(r, shape[1])
                tensors.update({f"{name}.hada_t{i}": t, f"{name}.hada_w{i}_a": wa, f"{name}.hada_w{i}_b": wb})
                rebuilt.append(torch.einsum("ijhw,jq,ip->pqhw", t, wb, wa))
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
            delta[(component, module)] = rebuilt[0] * rebuilt[1] * alpha / r1
            continue
        flat = int(torch.tensor(shape[1:]).prod())
        w1a, w1b, w2a, w2b = (t.to(dtype) for t in (randn(shape[0], r1), randn(r1, flat), randn(shape[0], r2),
                                                   randn(r2, flat)))
        tensors.update({f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b, f"{name}.hada_w2_a": w2a,
                        f"{name}.hada_w2_b": w2b, f"{name}.alpha": torch.tensor(alpha)})
        product = (w1a.float() @ w1b.float()) * (w2a.float() @ w2b.float())
        delta[(component, module)] = product.reshape(shape) * alpha / r1
    save_file(tensors, out)
    return out, delta


def lokr(out: Path, variant: str, seed: int = 4, rank: int = 2, alpha: float = 3.0) -> tuple[Path, Delta]:
    """LyCORIS LoKr. variant: "w2_decomposed" (full w1, w2 = w2a w2b), "full" (full w1 and w2; a conv's w2 is
    4-D), "both_decomposed" (w1 = w1a w1b and w2 = w2a w2b), "tucker" (w2_decomposed, but the k×k convolutions'
    w2 is a Tucker product, LyCORIS's use_tucker: einsum("i j h w, i p, j q -> p q h w", t2, w2_a, w2_b),
    w2_a (r, c), w2_b (r, d))."""
    randn, tensors, delta = _gen(seed), {}, {}
    for component, module in _targets():
        shape, name = SHAPES[module], kohya_name(module, component)
        a, b = 8, shape[1] // 8 if shape[1] >= 64 else 4
        c, d = shape[0] // a, shape[1] // b
        kernel = shape[2:]
        if variant == "both_decomposed":
            w1a, w1b = randn(a, rank), randn(rank, b)
            tensors[f"{name}.lokr_w1_a"], tensors[f"{name}.lokr_w1_b"] = w1a, w1b
            w1 = w1a @ w1b
        else:
            w1 = tensors[f"{name}.lokr_w1"] = randn(a, b)
        if variant == "full":
            w2 = tensors[f"{name}.lokr_w2"] = randn(c, d, *kernel)
            dim = rank if variant == "both_decomposed" else None
        elif variant == "tucker" and kernel and kernel[0] > 1:
            t2, w2a, w2b = randn(rank, rank, *kernel), randn(rank, c), randn(rank, d)
            tensors.update({f"{name}.lokr_t2": t2, f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b})
            w2 = torch.einsum("ijhw,ip,jq->pqhw", t2, w2a, w2b).contiguous()
            dim = rank
        else:
            w2a, w2b = randn(c, rank), randn(rank, d * int(torch.tensor(kernel).prod()))
            tensors[f"{name}.lokr_w2_a"], tensors[f"{name}.lokr_w2_b"] = w2a, w2b
            w2 = (w2a @ w2b).reshape(c, d, *kernel)
            dim = rank
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
        w1_full = w1[:, :, None, None] if kernel else w1
        scale = alpha / dim if dim else 1.0
        delta[(component, module)] = torch.kron(w1_full, w2).reshape(shape) * scale
    save_file(tensors, out)
    return out, delta


def fake(out: Path, *keys: str) -> Path:
    save_file({key: torch.zeros(4, 4) for key in keys}, out)
    return out


SDXL_UNET = {"down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k": (64, 96),
             "mid_block.attentions.0.proj_in": (64, 64),
             "up_blocks.0.resnets.1.conv1": (64, 128, 3, 3),
             "up_blocks.0.upsamplers.0.conv": (64, 64, 3, 3)}
SDXL_TEXT = {("text_encoder", "lora_te1_"): 32, ("text_encoder_2", "lora_te2_"): 64}


def sdxl_kohya_sgm(out: Path, seed: int = 9, rank: int = 4, alpha: float = 3.0) -> tuple[Path, Delta]:
    """An SDXL Kohya file with SGM block names for the UNet and lora_te1_/lora_te2_ text-encoder keys."""
    randn, tensors, delta = _gen(seed), {}, {}
    layers = [("unet", m, shape, "lora_unet_" + unet_key_to_ldm(m + ".weight", 2, [True, False])
               .removesuffix(".weight").replace(".", "_")) for m, shape in SDXL_UNET.items()]
    for (component, prefix), width in SDXL_TEXT.items():
        for p in ("q", "k", "v", "out"):
            module = f"text_model.encoder.layers.0.self_attn.{p}_proj"
            layers.append((component, module, (width, width), prefix + module.replace(".", "_")))
    for component, module, shape, name in layers:
        down = randn(rank, *shape[1:])
        up = randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []))
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                        f"{name}.alpha": torch.tensor(alpha)})
        delta[(component, module)] = (up.flatten(1) @ down.flatten(1)).reshape(shape) * alpha / rank
    save_file(tensors, out)
    return out, delta


Magnitudes = dict[tuple[str, str], torch.Tensor]  # (component, module) -> DoRA magnitude, one per output channel


def _magnitudes(seed: int, text: bool = True) -> Magnitudes:
    randn = _gen(seed)
    return {(c, m): randn(SHAPES[m][0]).abs() + 0.5 for c, m in _targets(text)}


def with_dora_scale(written: tuple[Path, Delta], seed: int = 11, per_input: bool = False
                    ) -> tuple[Path, Delta, Magnitudes]:
    """A Kohya/LyCORIS file (LoRA, LoHa, LoKr) made DoRA: a `dora_scale` for every layer, as LyCORIS's
    default (`wd_on_output`) stores it, (out, 1) or (out, 1, 1, 1); `per_input`: (1, in[, 1, 1]) as older
    LyCORIS did."""
    path, delta = written
    tensors, metadata = load_file(path), None
    magnitudes = {key: m for key, m in _magnitudes(seed).items() if key in delta}
    for (component, module), m in magnitudes.items():
        shape = SHAPES[module]
        trail = [1] * (len(shape) - 2)
        scale = m[:, None] if not per_input else torch.rand(1, shape[1]) + 0.5
        tensors[f"{kohya_name(module, component)}.dora_scale"] = scale.reshape(*scale.shape, *trail)
    save_file(tensors, path, metadata)
    return path, delta, magnitudes


def peft_dora(out: Path, seed: int = 12, rank: int = 4) -> tuple[Path, Delta, Magnitudes]:
    """DoRA in PEFT/diffusers keys (`unet.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector`),
    as diffusers' `save_lora_weights` writes PEFT's `get_peft_model_state_dict`: magnitude (out,) for a Linear
    layer, (1, out, 1, 1) for a convolution; no alpha (scale 1)."""
    randn, tensors, delta = _gen(seed), {}, {}
    magnitudes = _magnitudes(seed + 1)
    for component, module in _targets():
        shape, prefix = SHAPES[module], f"{component}.{module}"
        down = randn(rank, *shape[1:])
        up = randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []))
        m = magnitudes[(component, module)]
        tensors.update({f"{prefix}.lora_A.weight": down, f"{prefix}.lora_B.weight": up,
                        f"{prefix}.lora_magnitude_vector": m.reshape(1, -1, 1, 1) if len(shape) == 4 else m})
        delta[(component, module)] = (up.flatten(1) @ down.flatten(1)).reshape(shape)
    save_file(tensors, out)
    return out, delta, magnitudes


def dora_weight(base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float) -> torch.Tensor:
    """The DoRA reference: m · (W + w·ΔW) / ||W + w·ΔW||, the norm of each output channel (over the input
    channels and the kernel), w the strength (PEFT's semantics: it scales ΔW inside the norm)."""
    direction = base.float() + strength * delta
    norm = direction.flatten(1).norm(dim=1)
    return direction * (magnitude / norm).reshape(-1, *[1] * (base.dim() - 1))
