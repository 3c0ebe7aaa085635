"""MODEL values: frozen recipes that say what a pipeline should be, never the pipeline itself.

diffusers pipelines are mutable (loading a LoRA changes the UNet in place) while a caching graph
needs values that never change. So loader nodes only build a `ModelRecipe`: the checkpoint's
identity and dtype plus the ordered LoRA operations. The reconciler (`nodes/engine/reconcile.py`) makes
a resident pipeline match a recipe when a node such as Sample needs the real thing.

A recipe reduces to two parts (see `fused_groups` and `live`): the LoRAs baked into the weights
by FuseLoRA, in order, and the adapters still live on top of them with their strengths.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Adapter:
    """A LoRA file loaded into an adapter slot, with its strengths."""

    slot: str
    path: str
    fingerprint: str  # size + mtime of the file, so a changed file is a different adapter
    strength: float = 1.0
    te_strength: float = 1.0
    block_scales: str = ""  # canonical JSON of diffusers' block-wise UNet scales, "" for none
    components: tuple[str, ...] = ("unet",)  # the parts of the model the file has layers for
    rank: int = 0  # the largest rank in the file (for hot-swap preparation)

    def same_file(self, other: Adapter) -> bool:
        return (self.path, self.fingerprint) == (other.path, other.fingerprint)

    def weight(self, component: str, module: str, strength: float | None = None) -> float:
        """The factor on a layer's own alpha/rank: the text-encoder strength, or strength × block scale.

        Block scales multiply the strength, so strength 0 is no LoRA whatever the blocks say; parts the JSON
        leaves out and layers outside the attention blocks (resnets, samplers, conv_in) get the strength alone.
        `strength` overrides the adapter's own (a scheduled slot is written at strength 1, then per step).
        """
        if component.startswith("text_encoder"):
            return self.te_strength
        unet = self.strength if strength is None else strength
        return unet * block_scale(self.block_scales, module) if self.block_scales else unet


@dataclass(frozen=True)
class Embedding:
    """A textual-inversion embedding on a CLIP recipe, named in prompts as `embedding:name` or `<name>`."""

    name: str
    path: str
    fingerprint: str


@dataclass(frozen=True)
class IPAdapter:
    """ApplyIPAdapter: an IP-Adapter file in the UNet at `scale`, with the image embeddings it is shown.

    The embeddings are float32 bytes of shape `shape` ((images, width), or (images, tokens, width) for adapters
    that take hidden states), with the negative side's (empty: zeros), so the recipe stays immutable and
    comparable; engine/ip_adapter.py loads the file, nodes/sampling.py passes the embeddings.
    """

    path: str
    fingerprint: str
    scale: float
    embeds: bytes = field(repr=False)
    shape: tuple[int, ...] = (0, 0)
    negative: bytes = field(default=b"", repr=False)

    def same_file(self, other: IPAdapter) -> bool:
        return (self.path, self.fingerprint) == (other.path, other.fingerprint)


@dataclass(frozen=True)
class Fuse:
    """FuseLoRA: bake these live slots into the weights at `lora_scale`."""

    slots: tuple[str, ...]
    lora_scale: float = 1.0


@dataclass(frozen=True)
class Compile:
    """CompileModel: `torch.compile` the denoiser in place with these settings."""

    mode: str = "default"
    fullgraph: bool = False
    dynamic: bool = False


@dataclass(frozen=True)
class ModelRecipe:
    checkpoint: str  # absolute path of the diffusers folder or single file
    fingerprint: str
    family: str  # sd15, sd2, sdxl
    dtype: str  # auto, fp32, fp16, bf16 (auto is resolved per device when the pipeline is loaded)
    ops: tuple[Adapter | Fuse, ...] = ()
    # Hot-swap preparation (`enable_lora_hotswap(target_rank)`) before the first adapter is loaded:
    # 0 for none. Once a slot may be swapped, or a schedule must run on a compiled model, it is set.
    hotswap_rank: int = 0
    compile: Compile | None = None
    schedules: tuple[tuple[str, str], ...] = ()  # (slot, schedule JSON): per-step UNet scales
    # Which target of the pipeline this recipe is for: "unet" (a MODEL: the denoiser) or "clip" (a CLIP: the
    # text encoders, where an adapter's weight is its te_strength). CLIP recipes have no hot-swap or compile.
    part: str = "unet"
    sampling_shift: float = 0.0  # SD3/Flux: ModelSamplingSD3's shift or ModelSamplingFlux's mu; 0 = the family's
    clip_skip: int = 0  # CLIP only: text-encoder layers skipped from the end (ComfyUI's stop_at_clip_layer -1 - n)
    embeddings: tuple[Embedding, ...] = ()  # CLIP only: textual inversions for its prompts (engine/embeddings.py)
    ip_adapter: IPAdapter | None = None  # MODEL only: an image prompt (engine/ip_adapter.py)

    def then(self, op: Adapter | Fuse) -> ModelRecipe:
        # A pipeline prepared for hot-swap pads every adapter to the target rank: keep it large enough.
        rank = max(self.hotswap_rank, op.rank) if self.hotswap_rank and isinstance(op, Adapter) else self.hotswap_rank
        return replace(self, ops=(*self.ops, op), hotswap_rank=rank)

    def prepared_for_hotswap(self, rank: int = 0) -> ModelRecipe:
        """This recipe, with hot-swap preparation at least `rank` and every adapter's rank."""
        ranks = [a.rank for a in self.live().values()] + [a.rank for g, _ in self.fused_groups() for a in g]
        return replace(self, hotswap_rank=max([self.hotswap_rank, rank, 1, *ranks]))

    def bare(self) -> ModelRecipe:
        """The checkpoint alone: what a freshly loaded pipeline realizes."""
        return ModelRecipe(self.checkpoint, self.fingerprint, self.family, self.dtype, part=self.part)

    def clip(self) -> ModelRecipe:
        """The text-encoder side of this recipe: the same LoRAs and fuses, weighted by their te_strength."""
        return replace(self, part="clip", hotswap_rank=0, compile=None, schedules=(), ip_adapter=None)

    @property
    def base(self) -> tuple[str, str]:
        """The checkpoint file this recipe starts from (the model manager adds dtype and device)."""
        return self.checkpoint, self.fingerprint

    def live(self) -> dict[str, Adapter]:
        """The adapters active on top of the weights after every op, by slot, in load order."""
        return self._reduce()[1]

    def fused_groups(self) -> tuple[tuple[tuple[Adapter, ...], float], ...]:
        """Each FuseLoRA, in order: the adapters it baked in and its lora_scale."""
        return self._reduce()[0]

    def _reduce(self) -> tuple[tuple[tuple[tuple[Adapter, ...], float], ...], dict[str, Adapter]]:
        live: dict[str, Adapter] = {}
        fused: list[tuple[tuple[Adapter, ...], float]] = []
        for op in self.ops:
            if isinstance(op, Adapter):
                live[op.slot] = op
            else:
                fused.append((tuple(live.pop(slot) for slot in op.slots), op.lora_scale))
        return tuple(fused), live

    def summary(self) -> str:
        name = self.checkpoint.rsplit("/", 1)[-1]
        loras = ", ".join(f"{a.slot}@{a.strength:g}" for a in self.live().values())
        fused = sum(len(group) for group, _ in self.fused_groups())
        return (
            f"{name} ({self.family}, {self.dtype})"
            + (f" + {loras}" if loras else "")
            + (f", {fused} fused" if fused else "")
            + (f", IP-Adapter@{self.ip_adapter.scale:g}" if self.ip_adapter else "")
        )


@functools.lru_cache(maxsize=1024)
def _scales(block_scales: str) -> dict[str, Any]:
    scales: dict[str, Any] = json.loads(block_scales)
    return scales


def block_scale(block_scales: str, module: str) -> float:
    """The scale a block-scales JSON gives a UNet module, the way diffusers' `set_adapters` reads it.

    `{"down": …, "mid": …, "up": …}`: a number for a whole part, or `{"block_i": number or [one per attention
    layer]}`; it applies to the attention layers (`down_blocks.i.attentions.j.…`, `mid_block.attentions.…`).
    Anything the JSON does not name, and every module outside an attention block, is 1.0.
    """
    parts = module.split(".")
    if len(parts) > 2 and parts[0] == "mid_block" and parts[1] == "attentions":
        value = _scales(block_scales).get("mid", 1.0)
        return float(value[0] if isinstance(value, list) else value)
    if len(parts) < 4 or parts[0] not in ("down_blocks", "up_blocks") or parts[2] != "attentions":
        return 1.0
    value = _scales(block_scales).get(parts[0].removesuffix("_blocks"), 1.0)
    if isinstance(value, dict):
        value = value.get(f"block_{parts[1]}", 1.0)
    if isinstance(value, list):
        value = value[int(parts[3])] if len(value) > 1 else value[0]
    return float(value)
