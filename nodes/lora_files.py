"""LoRA files, read from the safetensors header only: is it a LoRA, which components, which ranks.

Used before anything touches a pipeline (LoadLoRA's checks), and by hot-swap to pick a target
rank without loading the files. Formats: diffusers/PEFT (`lora_A`/`lora_B`, `lora.down`/`lora.up`)
and Kohya (`lora_down`/`lora_up`/`alpha`, `lora_unet_…`, `lora_te_…`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from nodes.checkpoints import CheckpointError, read_header

# The "down" (A) matrix of each LoRA layer, in the formats diffusers converts; group 1 is the module.
_DOWN = re.compile(r"^(.*?)\.(?:lora_A(?:\.[\w-]+)?\.weight|lora_down\.weight|lora\.down\.weight)$")


class LoraFileError(ValueError):
    """A file that cannot be a LoRA: not safetensors, corrupt, or without LoRA layers."""


@dataclass(frozen=True)
class LoraInfo:
    format: str  # "kohya" or "peft"
    ranks: dict[str, int]  # module key (as written in the file) -> rank
    components: frozenset[str]  # unet, text_encoder, text_encoder_2

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())

    @property
    def targets(self) -> frozenset[str]:
        return normalized_targets(self)


def inspect(path: Path) -> LoraInfo:
    try:
        header = read_header(path)
    except CheckpointError as exc:
        raise LoraFileError(str(exc)) from None
    ranks = {}
    for key, shape in header.shapes.items():
        match = _DOWN.match(key)
        if match and len(shape) >= 2:
            ranks[match.group(1)] = shape[0]
    if not ranks:
        raise LoraFileError(
            f"{path.name}: no LoRA layers in it (no lora_A/lora_down tensors); is it a checkpoint or an embedding?"
        )
    kohya = any(".lora_down." in key for key in header.shapes)
    return LoraInfo("kohya" if kohya else "peft", ranks, frozenset(map(_component, ranks)))


def _component(module: str) -> str:
    if module.startswith(("lora_te2_", "text_encoder_2.", "te2.")):
        return "text_encoder_2"
    if module.startswith(("lora_te_", "lora_te1_", "text_encoder.", "te1.", "te.")):
        return "text_encoder"
    return "unet"


@functools.lru_cache(maxsize=256)
def targets(path: str, fingerprint: str) -> frozenset[str]:
    """The UNet modules a LoRA file targets, read once per file version (the fingerprint)."""
    return inspect(Path(path)).targets


def normalized_targets(info: LoraInfo) -> frozenset[str]:
    """The UNet modules a LoRA targets, in one spelling for every format (`down_blocks_1_…_to_q`)."""
    targets = set()
    for module in info.ranks:
        if _component(module) == "unet":
            name = module.removeprefix("lora_unet_").removeprefix("unet.").replace(".", "_")
            targets.add(name)
    return frozenset(targets)
