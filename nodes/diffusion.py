"""The diffusion nodes: LoadCheckpoint, LoadLoRA, FuseLoRA build MODEL recipes; Sample makes images.

Loader nodes never touch a pipeline: they check their files (headers only) and return a new
frozen recipe, so they are cheap and cache well. Sample is where a recipe becomes a live
pipeline (`nodes.pipelines.materialize`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from nodegraph.cache import file_fingerprint
from nodegraph.context import Context, NodeFailure
from nodegraph.schema import Input, Node, Output
from nodegraph.settings import ModelChoices, Settings
from nodes import lora_files
from nodes.recipe import Adapter, Fuse, ModelRecipe

_SLOT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


_checkpoints = ModelChoices("checkpoints", folders=True)
_loras = ModelChoices("loras")


def slot_problems(slot: str) -> list[tuple[str | None, str]]:
    """A slot name is empty (automatic) or a PEFT-safe name: letters, digits and _."""
    if slot and not _SLOT.match(slot):
        return [("slot", f"{slot[:40]!r} is not a slot name (letters, digits and _, up to 64)")]
    return []


def lora_file(settings: Settings, name: str) -> tuple[Path, lora_files.LoraInfo]:
    """A LoRA from the models folder and what its header says, or a node error on `lora`."""
    path = _model_file(settings, "loras", name, "lora")
    try:
        return path, lora_files.inspect(path)
    except lora_files.LoraFileError as exc:
        raise NodeFailure(str(exc), "lora", "bad_lora") from None


def check_fits(model: ModelRecipe, path: Path, fingerprint: str, block_scales: str = "") -> None:
    """A node error on `lora` (or `block_scales`) unless the file's layers and the blocks exist in the model."""
    from nodes import lora_match

    try:
        problem = lora_match.mismatch(str(path), fingerprint, model.checkpoint, model.fingerprint)
    except lora_files.LoraFileError as exc:
        raise NodeFailure(str(exc), "lora", "bad_lora") from None
    if problem:
        raise NodeFailure(f"{path.name} does not fit this model, a LoRA for another architecture? {problem}",
                          "lora", "wrong_model")
    problem = lora_match.block_scales_mismatch(block_scales, model.checkpoint, model.fingerprint)
    if problem:
        raise NodeFailure(problem, "block_scales", "invalid_value")


def _model_file(settings: Settings, kind: str, name: str, input_name: str) -> Path:
    try:
        return settings.resolve_model(kind, name)
    except FileNotFoundError as exc:
        raise NodeFailure(str(exc), input_name, "file_not_found") from None


class LoadCheckpoint(Node):
    type = "LoadCheckpoint"
    version = "1.0.0"
    category = "model"
    description = (
        "A checkpoint from the models folder: a diffusers folder or a single .safetensors file "
        "(SD1.x/2.x, SDXL). Outputs a MODEL recipe; the weights load when a Sample needs them."
    )
    inputs = (
        Input("checkpoint", "COMBO", choices=_checkpoints),
        Input("dtype", "COMBO", default="auto", choices=("auto", "fp32", "fp16", "bf16")),
    )
    outputs = (Output("model", "MODEL"),)

    @classmethod
    def files(cls, inputs: dict[str, Any], settings: Any) -> list[Path]:
        return [_model_file(settings, "checkpoints", inputs["checkpoint"], "checkpoint")]

    def run(self, ctx: Context, checkpoint: str, dtype: str) -> dict[str, Any]:
        return {"model": checkpoint_recipe(ctx, checkpoint, dtype, "checkpoint")}


def checkpoint_recipe(ctx: Context, name: str, dtype: str, input_name: str) -> ModelRecipe:
    """The MODEL recipe of a checkpoint in the models folder; node errors on `input_name`."""
    from nodes.checkpoints import CheckpointError, detect_family

    path = _model_file(ctx.settings, "checkpoints", name, input_name)
    try:
        family = detect_family(path)
    except CheckpointError as exc:
        raise NodeFailure(str(exc), input_name, "bad_checkpoint") from None
    if family not in ("sd15", "sd2", "sdxl"):
        raise NodeFailure(f"{name}: {family} checkpoints are not supported yet", input_name, "bad_checkpoint")
    return ModelRecipe(str(path), file_fingerprint(path), family, dtype)


class LoadLoRA(Node):
    type = "LoadLoRA"
    version = "1.0.0"
    category = "lora"
    description = (
        "Adds a LoRA (diffusers, PEFT, Kohya or another format diffusers converts) to the model in "
        "an adapter slot, with UNet and text-encoder strengths. Chain several to stack them."
    )
    inputs = (
        Input("model", "MODEL"),
        Input("lora", "COMBO", choices=_loras),
        Input("strength", "FLOAT", default=1.0, min=-10.0, max=10.0, step=0.05),
        Input("text_encoder_strength", "FLOAT", default=1.0, min=-10.0, max=10.0, step=0.05),
        Input("slot", "STRING", default="", description="adapter name; empty: from the file name"),
        Input(
            "block_scales",
            "STRING",
            default="",
            multiline=True,
            description='UNet scales per block, as JSON: {"down": 0.5, "up": {"block_0": [0, 1, 1]}}',
        ),
    )
    outputs = (Output("model", "MODEL"),)

    @classmethod
    def check(cls, literals: dict[str, Any], settings: Any) -> list[tuple[str | None, str]]:
        problems = slot_problems(literals.get("slot", ""))
        problem = block_scales_problem(literals.get("block_scales", ""))
        if problem:
            problems.append(("block_scales", problem))
        return problems

    @classmethod
    def files(cls, inputs: dict[str, Any], settings: Any) -> list[Path]:
        return [_model_file(settings, "loras", inputs["lora"], "lora")]

    def run(
        self,
        ctx: Context,
        model: ModelRecipe,
        lora: str,
        strength: float,
        text_encoder_strength: float,
        slot: str,
        block_scales: str,
    ) -> dict[str, Any]:
        for name, problem in self.check({"slot": slot, "block_scales": block_scales}, ctx.settings):
            raise NodeFailure(problem, name, "invalid_value")
        path, info = lora_file(ctx.settings, lora)
        live = model.live()
        slot = slot or _free_slot(re.sub(r"\W", "_", path.stem), live)
        if slot in live:
            raise NodeFailure(
                f"slot {slot!r} already holds {Path(live[slot].path).name}; pick another slot, "
                "or replace it with HotswapLoRA",
                "slot",
                "slot_taken",
            )
        canonical = json.dumps(json.loads(block_scales), sort_keys=True) if block_scales.strip() else ""
        fingerprint = file_fingerprint(path)
        check_fits(model, path, fingerprint, canonical)
        adapter = Adapter(
            slot,
            str(path),
            fingerprint,
            strength,
            text_encoder_strength,
            canonical,
            tuple(sorted(info.components)),
            info.max_rank,
        )
        return {"model": model.then(adapter)}


class FuseLoRA(Node):
    type = "FuseLoRA"
    version = "1.0.0"
    category = "lora"
    description = (
        "Fuses adapters into the model's weights (faster sampling, no per-step LoRA cost). A later "
        "run without the fuse gets the original weights back exactly."
    )
    inputs = (
        Input("model", "MODEL"),
        Input("slots", "STRING", default="", description="comma-separated slots; empty: all active"),
        Input("lora_scale", "FLOAT", default=1.0, min=-10.0, max=10.0, step=0.05),
    )
    outputs = (Output("model", "MODEL"),)

    def run(self, ctx: Context, model: ModelRecipe, slots: str, lora_scale: float) -> dict[str, Any]:
        live = model.live()
        chosen = [s.strip() for s in slots.split(",") if s.strip()] or list(live)
        if not chosen:
            raise NodeFailure("the model has no active LoRA to fuse", "model", "nothing_to_fuse")
        unknown = [s for s in chosen if s not in live]
        if unknown:
            raise NodeFailure(
                f"no active adapter in slot(s) {', '.join(unknown)}; active: {', '.join(live) or 'none'}",
                "slots",
                "unknown_slot",
            )
        return {"model": model.then(Fuse(tuple(dict.fromkeys(chosen)), lora_scale))}


SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


class Sample(Node):
    type = "Sample"
    version = "1.0.0"
    category = "sampling"
    description = (
        "Text to image with the model's pipeline. The noise is drawn on the CPU from the seed: the same seed "
        "gives the same image on every device (up to the device's arithmetic)."
    )
    inputs = (
        Input("model", "MODEL"),
        Input("prompt", "STRING", default="", multiline=True),
        Input("negative_prompt", "STRING", default="", multiline=True),
        Input("seed", "INT", default=0, min=0, max=2**64 - 1),
        Input("steps", "INT", default=20, min=1, max=1000),
        Input("guidance", "FLOAT", default=7.0, min=0.0, max=100.0, step=0.1),
        Input("width", "INT", default=512, min=8, max=8192, step=8),
        Input("height", "INT", default=512, min=8, max=8192, step=8),
        Input("scheduler", "COMBO", default="euler", choices=tuple(SCHEDULERS)),
        Input("batch_size", "INT", default=1, min=1, max=64),
    )
    outputs = (Output("images", "IMAGE"),)

    @classmethod
    def check(cls, literals: dict[str, Any], settings: Any) -> list[tuple[str | None, str]]:
        return [
            (name, f"{literals[name]} is not a multiple of 8")
            for name in ("width", "height")
            if name in literals and literals[name] % 8
        ]

    @classmethod
    def check_resources(cls, literals: dict[str, Any], models: Any) -> list[tuple[str | None, str]]:
        """Refuse a size that cannot fit the device's memory whatever the model (its family and dtype
        are known only at run time, so the smallest factor and 2-byte elements are assumed here)."""
        from nodes.sampling import activation_bytes, room_for_activations, too_large

        if not all(name in literals for name in ("width", "height", "batch_size")):
            return []
        width, height, batch = literals["width"], literals["height"], literals["batch_size"]
        need = activation_bytes(None, width, height, batch, literals.get("guidance", 0) > 1, 2)
        problem = too_large(need, room_for_activations(models, 0), width, height, batch, models)
        return [problem] if problem else []

    def run(
        self,
        ctx: Context,
        model: ModelRecipe,
        prompt: str,
        negative_prompt: str,
        seed: int,
        steps: int,
        guidance: float,
        width: int,
        height: int,
        scheduler: str,
        batch_size: int,
    ) -> dict[str, Any]:
        import diffusers
        import numpy as np
        import torch

        from nodes.images import ImageBatch
        from nodes.pipelines import materialize, retry_out_of_memory, watch_compile
        from nodes.sampling import bounded_decode, initial_noise, noise_generator

        for name, problem in self.check({"width": width, "height": height}, ctx.settings):
            raise NodeFailure(problem, name, "invalid_value")
        check_activations(ctx, model, width, height, batch_size, guidance)
        with materialize(ctx, model, model.clip()) as resident:
            pipe = resident.pipe
            class_name, overrides = SCHEDULERS[scheduler]
            pipe.scheduler = getattr(diffusers, class_name).from_config(resident.scheduler_config, **overrides)

            scheduled = bool(resident.applied.schedules)

            def on_step(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                if scheduled:
                    resident.set_step(step + 1)  # scales for the next step, written in place
                ctx.progress(step + 1, steps)
                return {}

            def sample() -> Any:
                if scheduled:
                    resident.set_step(0)
                # Every draw on the CPU from the seed, so a seed is the same noise on every device.
                generator = noise_generator(seed)
                shape = (batch_size, pipe.unet.config.in_channels, height // pipe.vae_scale_factor,
                         width // pipe.vae_scale_factor)
                latents = initial_noise(generator, shape).to(resident.device, pipe.unet.dtype)
                ctx.check_cancelled()
                with torch.inference_mode(), watch_compile(ctx, resident), bounded_decode(ctx, pipe.vae, width,
                                                                                          height):
                    return pipe(
                        prompt=prompt,
                        negative_prompt=negative_prompt or None,
                        num_inference_steps=steps,
                        guidance_scale=guidance,
                        width=width,
                        height=height,
                        num_images_per_prompt=batch_size,
                        latents=latents,
                        generator=generator,
                        output_type="np",
                        callback_on_step_end=on_step,
                    )

            result = retry_out_of_memory(ctx, sample, f"sampling {batch_size}× {width}×{height}")
        pixels = (np.clip(result.images, 0.0, 1.0) * 255).round().astype(np.uint8)
        params = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "seed": seed,
            "steps": steps,
            "guidance": guidance,
            "width": width,
            "height": height,
            "scheduler": scheduler,
            "model": model.summary(),
        }
        return {"images": ImageBatch(pixels, params)}


def check_activations(ctx: Context, model: ModelRecipe, width: int, height: int, batch: int,
                      guidance: float) -> None:
    """Refuse, before loading anything, a Sample whose activations cannot fit the device's memory."""
    import torch

    from nodes.checkpoints import CheckpointError
    from nodes.pipelines import estimate_bytes, resolve_dtype
    from nodes.sampling import activation_bytes, room_for_activations, too_large

    dtype = resolve_dtype(model.dtype, ctx.models.device)
    element_size = torch.empty((), dtype=dtype).element_size()
    need = activation_bytes(model.family, width, height, batch, guidance > 1, element_size)
    try:
        weights = estimate_bytes(model.checkpoint, dtype)
    except CheckpointError:  # reported with its own message when it loads
        weights = 0
    problem = too_large(need, room_for_activations(ctx.models, weights), width, height, batch, ctx.models, weights)
    if problem:
        raise NodeFailure(problem[1], problem[0], "too_large")


def block_scales_problem(text: str) -> str | None:
    """What is wrong with a block-scales JSON (diffusers silently ignores unknown keys), or None."""
    if not text.strip():
        return None
    try:
        scales = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not JSON: {exc.msg}"
    if not isinstance(scales, dict) or not scales:
        return 'expected an object such as {"down": 0.5, "mid": 1, "up": {"block_0": [0, 1, 1]}}'
    for part, value in scales.items():
        if part not in ("down", "mid", "up"):
            return f"unknown part {part!r}; use down, mid and up"
        if _is_number(value):
            continue
        if part == "mid" or not isinstance(value, dict):
            return f"{part}: expected a number{'' if part == 'mid' else ' or an object of blocks'}"
        for block, scale in value.items():
            if not re.fullmatch(r"block_\d+", block):
                return f"{part}: unknown block {block!r}; use block_0, block_1, …"
            if not (_is_number(scale) or (isinstance(scale, list) and scale and all(map(_is_number, scale)))):
                return f"{part}.{block}: expected a number or a list of numbers (one per layer)"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _free_slot(stem: str, live: dict[str, Adapter]) -> str:
    slot, n = stem or "lora", 2
    while slot in live:
        slot, n = f"{stem}_{n}", n + 1
    return slot


NODES: list[type[Node]] = [LoadCheckpoint, LoadLoRA, FuseLoRA, Sample]
