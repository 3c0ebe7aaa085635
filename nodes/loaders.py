"""ComfyUI's loader nodes on recipes: CheckpointLoaderSimple, LoraLoader, LoraLoaderModelOnly.

Same names, input names, defaults and output order as ComfyUI, so its API-format workflows run
unchanged. They only build recipes: MODEL (the denoiser), CLIP (the text encoders) and VAE, three
views of one checkpoint that share one resident pipeline. A LoRA's UNet strength goes to the MODEL
and its text-encoder strength to the CLIP; the reconciler keeps the two sides apart, so changing
only one side never reloads the other.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from nodegraph.cache import file_fingerprint
from nodegraph.context import Context
from nodegraph.schema import Input, Node, Output
from nodes.diffusion import _checkpoints, _free_slot, _loras, _model_file, check_fits, checkpoint_recipe, lora_file
from nodes.recipe import Adapter, ModelRecipe

STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}


class CheckpointLoaderSimple(Node):
    type = "CheckpointLoaderSimple"
    version = "1.0.0"
    category = "loaders"
    description = ("A checkpoint as ComfyUI loads it: the denoiser (MODEL), the text encoders (CLIP) and the VAE. "
                   "Recipes only: the weights load when a node needs them.")
    inputs = (Input("ckpt_name", "COMBO", choices=_checkpoints),)
    outputs = (Output("MODEL", "MODEL"), Output("CLIP", "CLIP"), Output("VAE", "VAE"))

    @classmethod
    def files(cls, inputs: dict[str, Any], settings: Any) -> list[Path]:
        return [_model_file(settings, "checkpoints", inputs["ckpt_name"], "ckpt_name")]

    def run(self, ctx: Context, ckpt_name: str) -> dict[str, Any]:
        model = checkpoint_recipe(ctx, ckpt_name, "auto", "ckpt_name")
        return {"MODEL": model, "CLIP": model.clip(), "VAE": replace(model, part="vae")}


def _with_lora(ctx: Context, model: ModelRecipe, lora_name: str, strength: float) -> tuple[Adapter, ModelRecipe]:
    """The recipe with the LoRA file added in a new slot named after the file (ComfyUI stacks by order)."""
    path, info = lora_file(ctx.settings, lora_name)
    fingerprint = file_fingerprint(path)
    check_fits(model, path, fingerprint)
    slot = _free_slot(re.sub(r"\W", "_", path.stem), model.live())
    adapter = Adapter(slot, str(path), fingerprint, strength, strength, "", tuple(sorted(info.components)),
                      info.max_rank)
    return adapter, model.then(adapter)


class LoraLoader(Node):
    type = "LoraLoader"
    version = "1.0.0"
    category = "loaders"
    description = ("Adds a LoRA to the MODEL (strength_model, on the denoiser) and the CLIP (strength_clip, on the "
                   "text encoders). Strength 0 on a side leaves that side untouched.")
    inputs = (Input("model", "MODEL"), Input("clip", "CLIP"), Input("lora_name", "COMBO", choices=_loras),
              Input("strength_model", "FLOAT", **STRENGTH), Input("strength_clip", "FLOAT", **STRENGTH))
    outputs = (Output("MODEL", "MODEL"), Output("CLIP", "CLIP"))

    def run(self, ctx: Context, model: ModelRecipe, clip: ModelRecipe, lora_name: str, strength_model: float,
            strength_clip: float) -> dict[str, Any]:
        out: dict[str, Any] = {"MODEL": model, "CLIP": clip}
        if strength_model != 0:  # as ComfyUI: a zero strength does not touch that side at all
            out["MODEL"] = _with_lora(ctx, model, lora_name, strength_model)[1]
        if strength_clip != 0:
            out["CLIP"] = _with_lora(ctx, clip, lora_name, strength_clip)[1]
        return out


class LoraLoaderModelOnly(Node):
    type = "LoraLoaderModelOnly"
    version = "1.0.0"
    category = "loaders"
    description = "Adds a LoRA to the MODEL only (the denoiser); the CLIP side is not touched."
    inputs = (Input("model", "MODEL"), Input("lora_name", "COMBO", choices=_loras),
              Input("strength_model", "FLOAT", **STRENGTH))
    outputs = (Output("MODEL", "MODEL"),)

    def run(self, ctx: Context, model: ModelRecipe, lora_name: str, strength_model: float) -> dict[str, Any]:
        if strength_model == 0:
            return {"MODEL": model}
        return {"MODEL": _with_lora(ctx, model, lora_name, strength_model)[1]}


NODES: list[type[Node]] = [CheckpointLoaderSimple, LoraLoader, LoraLoaderModelOnly]
