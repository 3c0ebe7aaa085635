"""Key names of the original single-file layouts (ldm for SD 1.x/2.x, SGM for SDXL) for diffusers' module names.

    unet_key_to_ldm(key, layers_per_block, up_has_attention)  -> ldm UNet name (without `model.diffusion_model.`)
    vae_key_to_ldm(key, levels)                               -> ldm VAE name (without `first_stage_model.`)

Pure name mapping, one way (diffusers -> ldm): writing a single file (checkpoint_save.py, the demo models) maps
each tensor's name; loading one (single_file.py) maps each of the meta-built model's names and looks it up.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet_to_ldm(rest: str) -> str:
    layer, _, param = rest.partition(".")
    return f"{_RESNET_TO_LDM[layer]}.{param}"


def _block_part(kind: str, rest: str) -> str:
    """Inside one ldm block, slot 0 is the resnet (with its own layer names) and slot 1 the attention."""
    return f"1.{rest}" if kind == "attentions" else f"0.{_resnet_to_ldm(rest)}"


def unet_key_to_ldm(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """Map one diffusers UNet2DConditionModel key to its ldm (`model.diffusion_model.` less) name."""
    stride = layers_per_block + 1  # ldm blocks per level: the resnets plus a down/upsampler slot
    module, _, param = key.rpartition(".")
    if module in _UNET_FIXED_TO_LDM:
        return f"{_UNET_FIXED_TO_LDM[module]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = 1 + level * stride + index
        return f"input_blocks.{block}.{_block_part(kind, rest)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * stride}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        # The mid block is resnet, attention, resnet in one flat list.
        return f"middle_block.{2 * int(m[2])}.{_resnet_to_ldm(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = level * stride + index
        return f"output_blocks.{block}.{_block_part(kind, rest)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        # The upsampler follows the level's last resnet, and its attention when the level has one.
        slot = 2 if up_has_attention[level] else 1
        return f"output_blocks.{level * stride + layers_per_block}.{slot}.conv.{m[2]}"
    raise ValueError(f"no ldm name for UNet key '{key}'")


_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key_to_ldm(key: str, levels: int) -> str:
    """Map one diffusers AutoencoderKL key to its ldm (`first_stage_model.` less) name."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    # The decoder's up levels are numbered from the bottom in ldm, from the top in diffusers.
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION_TO_LDM[m[2]]}.{m[3]}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv keep their names


def _with_text_model_level(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's CLIPTextModel has no `text_model.` level; the original layouts do."""
    return {
        (k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v for k, v in state.items()
    }
