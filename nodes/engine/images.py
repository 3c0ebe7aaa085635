"""IMAGE values: a batch of 8-bit RGB images plus the parameters that made them.

Frozen and backed by one uint8 array, so it caches by size (`nbytes`) and never changes after
a node returns it. `params` (prompt, seed, steps, model, …) goes into saved PNGs' text chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True, eq=False)
class ImageBatch:
    pixels: np.ndarray  # (batch, height, width, 3), uint8
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pixels.dtype != "uint8" or self.pixels.ndim != 4 or self.pixels.shape[-1] != 3:
            raise ValueError(
                f"an ImageBatch is (batch, height, width, 3) uint8, got {self.pixels.shape} {self.pixels.dtype}"
            )
        self.pixels.setflags(write=False)

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def summary(self) -> str:
        batch, height, width, _ = self.pixels.shape
        return f"{batch} image(s), {width}×{height}"
