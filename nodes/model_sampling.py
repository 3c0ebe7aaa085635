"""ComfyUI's ModelSamplingFlux and ModelSamplingSD3: the shift of a flow-matching model's noise levels.

The shift is part of the MODEL recipe (`sampling_shift`): it changes no weight, only the sigmas KSampler
runs (`nodes.engine.flow`). ModelSamplingFlux computes Flux's from the image size, as diffusers' Flux pipeline
does on its own (its resolution-dependent shift); without the node, KSampler uses ComfyUI's defaults
(Flux 1.15, SD3 3.0).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from nodegraph.context import Context, NodeFailure
from nodegraph.schema import Input, Node, Output
from nodes.engine.recipe import ModelRecipe


def _require(model: ModelRecipe, family: str, node: str) -> None:
    if model.family != family:
        raise NodeFailure(f"{node} is for {family} models; this MODEL is {model.family}", "model", "wrong_model")


class ModelSamplingFlux(Node):
    type = "ModelSamplingFlux"
    version = "1.0.0"
    category = "advanced/model"
    description = ("Flux's resolution-dependent shift: base_shift at 256 image tokens, max_shift at 4096, linear "
                   "between (set width and height to the image's).")
    inputs = (Input("model", "MODEL"),
              Input("max_shift", "FLOAT", default=1.15, min=0.0, max=100.0, step=0.01),
              Input("base_shift", "FLOAT", default=0.5, min=0.0, max=100.0, step=0.01),
              Input("width", "INT", default=1024, min=16, max=16384, step=8),
              Input("height", "INT", default=1024, min=16, max=16384, step=8))
    outputs = (Output("MODEL", "MODEL"),)

    def run(self, ctx: Context, model: ModelRecipe, max_shift: float, base_shift: float, width: int,
            height: int) -> dict[str, Any]:
        from nodes.engine.flow import flux_shift

        _require(model, "flux", self.type)
        return {"MODEL": replace(model, sampling_shift=flux_shift(width, height, max_shift, base_shift))}


class ModelSamplingSD3(Node):
    type = "ModelSamplingSD3"
    version = "1.0.0"
    category = "advanced/model"
    description = "SD3's timestep shift: higher spends more steps at high noise (3.0 is the model's own)."
    inputs = (Input("model", "MODEL"), Input("shift", "FLOAT", default=3.0, min=0.01, max=100.0, step=0.01))
    outputs = (Output("MODEL", "MODEL"),)

    def run(self, ctx: Context, model: ModelRecipe, shift: float) -> dict[str, Any]:
        _require(model, "sd3", self.type)
        return {"MODEL": replace(model, sampling_shift=shift)}


NODES: list[type[Node]] = [ModelSamplingFlux, ModelSamplingSD3]
