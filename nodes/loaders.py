"""Loader nodes: checkpoints and LoRAs into recipes (the checks they share are in nodes/model_files.py).

LoadCheckpoint (ours: one MODEL recipe) and ComfyUI's CheckpointLoaderSimple, LoraLoader and
LoraLoaderModelOnly, with ComfyUI's names, input names, defaults and output order, so its API-format
workflows run unchanged. They only build recipes: MODEL (the denoiser), CLIP (the text encoders) and
VAE, three views of one checkpoint that share one resident pipeline. A LoRA's UNet strength goes to the
MODEL and its text-encoder strength to the CLIP; the reconciler keeps the two sides apart, so changing
only one side never reloads the other. Files are checked from their headers before anything runs: a
LoRA for another architecture is an error here, naming the file and its first layer that differs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from nodegraph.cache import file_fingerprint
from nodegraph.context import Context, NodeFailure
from nodegraph.schema import Input, Node, Output, Upstream
from nodegraph.settings import ModelChoices
from nodes.engine.recipe import Adapter, ModelRecipe
from nodes.model_files import (
    check_fits,
    checkpoint_code,
    fit_hint,
    fit_upstream,
    free_slot,
    lora_file,
    lora_fits,
    model_file,
    tokenizer_problems,
)

_checkpoints = ModelChoices("checkpoints", folders=True)
_loras = ModelChoices("loras", hint=lambda settings, upstream: fit_hint("loras", lora_fits)(settings, upstream))
_diffusion_models = ModelChoices("diffusion_models", folders=True)
_text_encoders = ModelChoices("text_encoders")
_vaes = ModelChoices("vae")


class LoadCheckpoint(Node):
    type = "LoadCheckpoint"
    version = "1.0.0"
    category = "model"
    description = (
        "A checkpoint from the models folder: a diffusers folder or a single .safetensors file "
        "(SD1.x/2.x, SDXL; SD3 and Flux as folders). Outputs a MODEL recipe; the weights load when a Sample needs them."
    )
    inputs = (
        Input("checkpoint", "COMBO", choices=_checkpoints),
        Input("dtype", "COMBO", default="auto", choices=("auto", "fp32", "fp16", "bf16")),
    )
    outputs = (Output("model", "MODEL"),)

    @classmethod
    def files(cls, inputs: dict[str, Any], settings: Any) -> list[Path]:
        return [model_file(settings, "checkpoints", inputs["checkpoint"], "checkpoint")]

    @classmethod
    def check_upstream(cls, literals: dict[str, Any], upstream: Callable[[str], Upstream | None],
                       settings: Any) -> list[tuple[str | None, str, str]]:
        return tokenizer_problems(settings, "checkpoints", {"checkpoint": literals.get("checkpoint")})

    def run(self, ctx: Context, checkpoint: str, dtype: str) -> dict[str, Any]:
        return {"model": checkpoint_recipe(ctx, checkpoint, dtype, "checkpoint")}


def checkpoint_recipe(ctx: Context, name: str, dtype: str, input_name: str) -> ModelRecipe:
    """The MODEL recipe of a checkpoint in the models folder; node errors on `input_name`."""
    from nodes.engine.checkpoints import CheckpointError, detect_family
    from nodes.engine.clip_tokenizers import missing_tokenizer

    path = model_file(ctx.settings, "checkpoints", name, input_name)
    try:
        family = detect_family(path)
    except CheckpointError as exc:
        raise NodeFailure(str(exc), input_name, "bad_checkpoint") from None
    if family not in ("sd15", "sd2", "sdxl", "sd3", "flux"):
        raise NodeFailure(f"{name}: {family} checkpoints are not supported yet", input_name, "bad_checkpoint")
    missing = missing_tokenizer(path)  # (a linked name: not seen at validation)
    if missing:
        raise NodeFailure(missing, input_name, "missing_tokenizer")
    return ModelRecipe(str(path), file_fingerprint(path), family, dtype)


def transformer_only(recipe: ModelRecipe) -> bool:
    """A Flux transformer-only file: a MODEL, with no text encoders or VAE to offer."""
    from nodes.engine.transformer_checkpoints import is_transformer_file

    path = Path(recipe.checkpoint)
    return path.is_file() and recipe.family == "flux" and is_transformer_file(path)



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
        return [model_file(settings, "checkpoints", inputs["ckpt_name"], "ckpt_name")]

    @classmethod
    def check_upstream(cls, literals: dict[str, Any], upstream: Callable[[str], Upstream | None],
                       settings: Any) -> list[tuple[str | None, str, str]]:
        return tokenizer_problems(settings, "checkpoints", {"ckpt_name": literals.get("ckpt_name")})

    def run(self, ctx: Context, ckpt_name: str) -> dict[str, Any]:
        model = checkpoint_recipe(ctx, ckpt_name, "auto", "ckpt_name")
        if transformer_only(model):
            raise NodeFailure(f"{ckpt_name} holds only a Flux transformer (no text encoders or VAE): load it with "
                              "UNETLoader, and the CLIP and VAE from a Flux diffusers folder", "ckpt_name",
                              "bad_checkpoint")
        return {"MODEL": model, "CLIP": model.clip(), "VAE": replace(model, part="vae")}


def _with_lora(ctx: Context, model: ModelRecipe, lora_name: str, strength: float) -> tuple[Adapter, ModelRecipe]:
    """The recipe with the LoRA file added in a new slot named after the file (ComfyUI stacks by order)."""
    path, info = lora_file(ctx.settings, lora_name)
    fingerprint = file_fingerprint(path)
    check_fits(model, path, fingerprint, lora_input="lora_name")
    slot = free_slot(re.sub(r"\W", "_", path.stem), model.live())
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

    @classmethod
    def check_upstream(cls, literals: dict[str, Any], upstream: Callable[[str], Upstream | None],
                       settings: Any) -> list[tuple[str | None, str, str]]:
        return fit_upstream(literals, upstream, settings, "lora_name")

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

    @classmethod
    def check_upstream(cls, literals: dict[str, Any], upstream: Callable[[str], Upstream | None],
                       settings: Any) -> list[tuple[str | None, str, str]]:
        return fit_upstream(literals, upstream, settings, "lora_name")

    def run(self, ctx: Context, model: ModelRecipe, lora_name: str, strength_model: float) -> dict[str, Any]:
        if strength_model == 0:
            return {"MODEL": model}
        return {"MODEL": _with_lora(ctx, model, lora_name, strength_model)[1]}


class UNETLoader(Node):
    type = "UNETLoader"
    version = "1.0.0"
    category = "loaders"
    description = ("A denoiser alone, as ComfyUI's Load Diffusion Model: a Flux transformer file (original or ComfyUI "
                   "layout) from the diffusion_models folder, or a diffusers folder. Take the CLIP and VAE from a "
                   "folder of the same family (CheckpointLoaderSimple).")
    inputs = (Input("unet_name", "COMBO", choices=_diffusion_models),
              Input("weight_dtype", "COMBO", default="default", choices=("default", "fp32", "fp16", "bf16")))
    outputs = (Output("MODEL", "MODEL"),)

    @classmethod
    def files(cls, inputs: dict[str, Any], settings: Any) -> list[Path]:
        return [model_file(settings, "diffusion_models", inputs["unet_name"], "unet_name")]

    def run(self, ctx: Context, unet_name: str, weight_dtype: str) -> dict[str, Any]:
        from nodes.engine.checkpoints import CheckpointError, detect_family

        path = model_file(ctx.settings, "diffusion_models", unet_name, "unet_name")
        try:
            family = detect_family(path)
        except CheckpointError as exc:
            raise NodeFailure(str(exc), "unet_name", "bad_checkpoint") from None
        if family not in ("sd15", "sd2", "sdxl", "sd3", "flux"):
            raise NodeFailure(f"{unet_name}: {family} models are not supported yet", "unet_name", "bad_checkpoint")
        dtype = "auto" if weight_dtype == "default" else weight_dtype
        return {"MODEL": ModelRecipe(str(path), file_fingerprint(path), family, dtype)}


class DualCLIPLoader(Node):
    type = "DualCLIPLoader"
    version = "1.0.0"
    category = "loaders"
    description = ("Flux's two text encoders from the text_encoders folder, CLIP-L and T5 (either order), each one "
                   ".safetensors file in transformers' key layout, as ComfyUI loads them.")
    inputs = (Input("clip_name1", "COMBO", choices=_text_encoders),
              Input("clip_name2", "COMBO", choices=_text_encoders),
              Input("type", "COMBO", default="flux", choices=("flux",)))
    outputs = (Output("CLIP", "CLIP"),)

    @classmethod
    def files(cls, inputs: dict[str, Any], settings: Any) -> list[Path]:
        return [model_file(settings, "text_encoders", inputs[n], n) for n in ("clip_name1", "clip_name2")]

    @classmethod
    def check_upstream(cls, literals: dict[str, Any], upstream: Callable[[str], Upstream | None],
                       settings: Any) -> list[tuple[str | None, str, str]]:
        return tokenizer_problems(settings, "text_encoders", {n: literals.get(n) for n in ("clip_name1", "clip_name2")})

    def run(self, ctx: Context, clip_name1: str, clip_name2: str, type: str) -> dict[str, Any]:
        from nodes.engine.checkpoints import CheckpointError
        from nodes.engine.component_files import flux_text_encoders_folder, text_encoder_kind

        files: dict[str, tuple[Path, str]] = {}
        for name, value in (("clip_name1", clip_name1), ("clip_name2", clip_name2)):
            path = model_file(ctx.settings, "text_encoders", value, name)
            try:
                files.setdefault(text_encoder_kind(path), (path, name))
            except CheckpointError as exc:
                raise NodeFailure(str(exc), name, "bad_checkpoint") from None
        if set(files) != {"clip", "t5"}:
            raise NodeFailure(f"Flux takes one CLIP-L and one T5; both files are {next(iter(files)).upper()}",
                              "clip_name2", "wrong_model")
        try:
            folder = flux_text_encoders_folder(files["clip"][0], files["t5"][0])
        except CheckpointError as exc:
            at = files["t5"][1] if exc.path == files["t5"][0] else files["clip"][1]
            raise NodeFailure(str(exc), at, checkpoint_code(exc)) from None
        fingerprint = "+".join(file_fingerprint(path) for path, _ in files.values())
        return {"CLIP": ModelRecipe(str(folder), fingerprint, "flux", "auto", part="clip")}


class VAELoader(Node):
    type = "VAELoader"
    version = "1.0.0"
    category = "loaders"
    description = "A VAE from the vae folder: one .safetensors file in the original (ldm) key layout, e.g. Flux's ae."
    inputs = (Input("vae_name", "COMBO", choices=_vaes),)
    outputs = (Output("VAE", "VAE"),)

    @classmethod
    def files(cls, inputs: dict[str, Any], settings: Any) -> list[Path]:
        return [model_file(settings, "vae", inputs["vae_name"], "vae_name")]

    def run(self, ctx: Context, vae_name: str) -> dict[str, Any]:
        from nodes.engine.checkpoints import CheckpointError
        from nodes.engine.component_files import vae_folder

        path = model_file(ctx.settings, "vae", vae_name, "vae_name")
        try:
            folder, family = vae_folder(path)
        except CheckpointError as exc:
            raise NodeFailure(str(exc), "vae_name", "bad_checkpoint") from None
        return {"VAE": ModelRecipe(str(folder), file_fingerprint(path), family, "auto", part="vae")}


NODES: list[type[Node]] = [LoadCheckpoint, CheckpointLoaderSimple, LoraLoader, LoraLoaderModelOnly, UNETLoader,
                           DualCLIPLoader, VAELoader]
