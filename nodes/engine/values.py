"""The tensor values that flow between ComfyUI-style nodes: CONDITIONING, LATENT and MASK.

Like every output, they are immutable once a node returns them (tensors are kept on the CPU and
never written to), so they cache by content and size like images do. Their layout follows
ComfyUI's, so its node semantics carry over:
- LATENT: `samples` (batch, channels, height/8, width/8) float32, unscaled by the VAE factor as the
  UNet sees them, plus an optional `noise_mask` (batch or 1, 1, height, width) where 1 means "repaint".
- MASK: (batch, height, width) float32 in 0..1.
- CONDITIONING: one or more entries, each a prompt's embeddings (1, tokens, dim), SDXL's pooled
  embedding, and extras (ControlNet hints attached by ControlNetApplyAdvanced). Several entries are
  sampled separately and their predictions averaged, as ComfyUI does for combined conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def _frozen(tensor: torch.Tensor) -> torch.Tensor:
    import torch

    return tensor.detach().to("cpu", torch.float32).contiguous()


@dataclass(frozen=True, eq=False)
class Latent:
    samples: torch.Tensor
    noise_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.samples.ndim != 4:
            raise ValueError(f"latent samples are (batch, channels, height, width), got {tuple(self.samples.shape)}")
        object.__setattr__(self, "samples", _frozen(self.samples))
        if self.noise_mask is not None:
            object.__setattr__(self, "noise_mask", _frozen(self.noise_mask))

    @property
    def nbytes(self) -> int:
        mask = 0 if self.noise_mask is None else self.noise_mask.numel() * 4
        return self.samples.numel() * 4 + mask

    def summary(self) -> str:
        batch, channels, height, width = self.samples.shape
        return f"{batch} latent(s), {channels}×{height}×{width}" + (", masked" if self.noise_mask is not None else "")


@dataclass(frozen=True, eq=False)
class MaskBatch:
    mask: torch.Tensor  # (batch, height, width), 0..1

    def __post_init__(self) -> None:
        if self.mask.ndim != 3:
            raise ValueError(f"a mask is (batch, height, width), got {tuple(self.mask.shape)}")
        object.__setattr__(self, "mask", _frozen(self.mask).clamp(0.0, 1.0))

    @property
    def nbytes(self) -> int:
        return self.mask.numel() * 4

    def summary(self) -> str:
        batch, height, width = self.mask.shape
        return f"{batch} mask(s), {width}×{height}"


@dataclass(frozen=True, eq=False)
class CondEntry:
    embeds: torch.Tensor  # (1, tokens, dim)
    pooled: torch.Tensor | None = None  # (1, dim) for SDXL
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. "control": ControlNet hints, applied in order

    def __post_init__(self) -> None:
        object.__setattr__(self, "embeds", _frozen(self.embeds))
        if self.pooled is not None:
            object.__setattr__(self, "pooled", _frozen(self.pooled))

    def with_extras(self, **extras: Any) -> CondEntry:
        return replace(self, extras={**self.extras, **extras})


@dataclass(frozen=True, eq=False)
class Conditioning:
    entries: tuple[CondEntry, ...]

    @property
    def nbytes(self) -> int:
        hints = {id(h): h.nbytes for e in self.entries for h in e.extras.get("control", ())}  # shared: once
        return sum(e.embeds.numel() * 4 + (0 if e.pooled is None else e.pooled.numel() * 4)
                   for e in self.entries) + sum(hints.values())

    def summary(self) -> str:
        return f"{len(self.entries)} conditioning entr{'y' if len(self.entries) == 1 else 'ies'}"
