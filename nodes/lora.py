"""LoRA nodes on MODEL recipes: LoadLoRA, FuseLoRA, HotswapLoRA, CompileModel, ScaleSchedule.

They never touch a pipeline: each checks its files (headers only) and returns a new frozen recipe,
so they are cheap and cache well; the reconciler makes a resident pipeline match when a sampler
needs it. People serving many LoRAs compile their model once and then change LoRAs and scales
without paying the compile again: the reconciler realizes HotswapLoRA with diffusers' in-place
hot-swap (`enable_lora_hotswap` before the first load, `hotswap=True` after) and writes LoRA scales
in place, so a compiled denoiser is never recompiled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from nodegraph.cache import file_fingerprint
from nodegraph.context import Context, NodeFailure
from nodegraph.schema import Input, Node, Output, Upstream
from nodes.engine import lora_files, lora_match, schedules
from nodes.engine.recipe import Adapter, Compile, Fuse, ModelRecipe
from nodes.loaders import _loras
from nodes.model_files import check_fits, fit_upstream, free_slot, lora_file, model_file, slot_problems


def prewarm(settings: Any, names: list[Any]) -> None:
    """Read these LoRA files into the resident LoRA cache on a background thread (a sweep will use them all),
    so that no switch waits for the disk. Keyed as the recipes will be: the resolved path and its fingerprint."""
    from nodes.engine import lora_cache

    paths = [lora_file(settings, name)[0] for name in names]
    lora_cache.CACHE.prewarm([(str(path), file_fingerprint(path)) for path in paths])


class LoadLoRA(Node):
    type = "LoadLoRA"
    version = "1.0.0"
    category = "lora"
    description = (
        "Adds a LoRA (diffusers, PEFT, Kohya, LyCORIS LoCon/LoHa/LoKr, DoRA, ComfyUI; see the README's format "
        "table) to the model in an adapter slot, with UNet and text-encoder strengths. Chain several to stack them."
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
    def prepare_sweep(cls, input_name: str, values: list[Any], literals: dict[str, Any],
                      settings: Any) -> dict[str, Any]:
        """Sweeping the LoRA: read the swept files into the LoRA cache ahead of the jobs that load them."""
        if input_name == "lora":
            prewarm(settings, values)
        return {}

    @classmethod
    def check(cls, literals: dict[str, Any], settings: Any) -> list[tuple[str | None, str]]:
        problems = slot_problems(literals.get("slot", ""))
        problem = block_scales_problem(literals.get("block_scales", ""))
        if problem:
            problems.append(("block_scales", problem))
        return problems

    @classmethod
    def files(cls, inputs: dict[str, Any], settings: Any) -> list[Path]:
        return [model_file(settings, "loras", inputs["lora"], "lora")]

    @classmethod
    def check_upstream(cls, literals: dict[str, Any], upstream: Callable[[str], Upstream | None],
                       settings: Any) -> list[tuple[str | None, str, str]]:
        scales = literals.get("block_scales", "")
        return fit_upstream(literals, upstream, settings, "lora", "" if block_scales_problem(scales) else scales)

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
        slot = slot or free_slot(re.sub(r"\W", "_", path.stem), live)
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



class HotswapLoRA(Node):
    type = "HotswapLoRA"
    version = "1.0.0"
    category = "lora"
    description = ("Replaces the LoRA in an adapter slot with another file, in place (diffusers' hot-swap): "
                   "no new adapter, and no recompile of a compiled model.")
    inputs = (Input("model", "MODEL"),
              Input("lora", "COMBO", choices=_loras),
              Input("slot", "STRING", default="", description="the slot to swap; empty: the only one"),
              Input("strength", "FLOAT", default=1.0, min=-10.0, max=10.0, step=0.05),
              Input("hotswap_rank", "INT", default=0, min=0, max=1024,
                    description="rank to pad every LoRA in the pipeline to; 0: the largest rank it can get"))
    outputs = (Output("model", "MODEL"),)

    @classmethod
    def check(cls, literals: dict[str, Any], settings: Any) -> list[tuple[str | None, str]]:
        """What the literals alone show cannot be swapped, before anything runs."""
        problems = slot_problems(literals.get("slot", ""))
        if settings is not None and "lora" in literals:
            try:
                _, info = lora_file(settings, literals["lora"])
            except NodeFailure as exc:
                return [*problems, ("lora", str(exc))]
            problems += _file_problems(literals["lora"], info, literals.get("hotswap_rank", 0))
        return problems

    @classmethod
    def files(cls, inputs: dict[str, Any], settings: Any) -> list[Path]:
        return [model_file(settings, "loras", inputs["lora"], "lora")]

    @classmethod
    def prepare_sweep(cls, input_name: str, values: list[Any], literals: dict[str, Any],
                      settings: Any) -> dict[str, Any]:
        """Sweeping the LoRA: prepare once for the largest rank among all the files swept, and read the files
        into the LoRA cache ahead of the jobs that swap them in."""
        if input_name == "lora":
            prewarm(settings, values)
        if input_name != "lora" or literals.get("hotswap_rank", 0):
            return {}
        return {"hotswap_rank": max(lora_file(settings, value)[1].max_rank for value in values)}

    @classmethod
    def check_upstream(cls, literals: dict[str, Any], upstream: Callable[[str], Upstream | None],
                       settings: Any) -> list[tuple[str | None, str, str]]:
        return fit_upstream(literals, upstream, settings, "lora", "")

    def run(self, ctx: Context, model: ModelRecipe, lora: str, slot: str, strength: float,
            hotswap_rank: int) -> dict[str, Any]:
        live = model.live()
        if not slot:
            if len(live) != 1:
                raise NodeFailure(f"the model has {len(live)} adapters ({', '.join(live) or 'none'}); "
                                  "name the slot to swap", "slot", "unknown_slot")
            slot = next(iter(live))
        if slot not in live:
            raise NodeFailure(f"no adapter in slot {slot!r} upstream (active: {', '.join(live) or 'none'}); "
                              "load one with LoadLoRA first", "slot", "unknown_slot")
        first = live[slot]
        if lora_files.inspect(Path(first.path)).dora:
            raise NodeFailure(f"slot {slot!r} holds {Path(first.path).name}, a DoRA file, which cannot be "
                              "hot-swapped (diffusers cannot swap DoRA magnitudes); load the file with LoadLoRA",
                              "slot", "not_swappable")
        path, info = lora_file(ctx.settings, lora)
        for input_name, problem in _file_problems(lora, info, hotswap_rank):
            raise NodeFailure(problem, input_name, "not_swappable")
        fingerprint = file_fingerprint(path)
        check_fits(model, path, fingerprint)
        fit = lora_match.model_layers(model.checkpoint, model.fingerprint)
        extra = (lora_files.unet_targets(str(path), fingerprint, fit.family, fit.unet_config)
                 - lora_files.unet_targets(first.path, first.fingerprint, fit.family, fit.unet_config))
        if extra:
            raise NodeFailure(f"{lora} targets {len(extra)} layer(s) that {Path(first.path).name} in slot "
                              f"{slot!r} does not (e.g. {sorted(extra)[0]}); a hot-swap can only use the "
                              "slot's layers or a subset", "lora", "not_swappable")
        target = hotswap_rank or max(first.rank, info.max_rank)
        if info.max_rank > target or first.rank > target:
            raise NodeFailure(f"rank {max(info.max_rank, first.rank)} exceeds hotswap_rank {target}",
                              "hotswap_rank", "not_swappable")
        swapped = replace(first, path=str(path), fingerprint=fingerprint, strength=strength,
                          rank=info.max_rank)
        # Preparation must come before the slot's first load, so it applies to the whole recipe.
        return {"model": model.prepared_for_hotswap(target).then(swapped)}


_NOT_SWAPPABLE = {"loha": "LyCORIS LoHa", "lokr": "LyCORIS LoKr"}


def _file_problems(lora: str, info: lora_files.LoraInfo, hotswap_rank: int) -> list[tuple[str | None, str]]:
    problems: list[tuple[str | None, str]] = []
    if info.format in _NOT_SWAPPABLE:
        problems.append(("lora", f"{lora} is a {_NOT_SWAPPABLE[info.format]} file, which cannot be hot-swapped "
                                 "(it loads as a LoRA of another shape); use LoadLoRA in another slot"))
    if info.dora:
        problems.append(("lora", f"{lora} is a DoRA file, which cannot be hot-swapped (diffusers cannot swap DoRA "
                                 "magnitudes); use LoadLoRA in another slot"))
    if info.components != {"unet"}:
        problems.append(("lora", f"{lora} has text-encoder layers, which diffusers cannot hot-swap; "
                                 "use LoadLoRA in another slot"))
    if hotswap_rank and info.max_rank > hotswap_rank:
        problems.append(("hotswap_rank", f"{lora} has rank {info.max_rank}, above hotswap_rank {hotswap_rank}"))
    return problems


class CompileModel(Node):
    type = "CompileModel"
    version = "1.0.0"
    category = "model"
    description = ("torch.compile the denoiser (in place, so adapters keep working). Hot-swaps, strengths and "
                   "schedules after this never recompile; a new resolution or batch size does unless dynamic. "
                   "The first sampling compiles: minutes on a CPU (about one for the demo model on 2 cores), "
                   "where a compiled model is rarely faster; it pays off on GPUs.")
    inputs = (Input("model", "MODEL"),
              Input("mode", "COMBO", default="default", choices=("default", "reduce-overhead", "max-autotune")),
              Input("fullgraph", "BOOLEAN", default=False),
              Input("dynamic", "BOOLEAN", default=False))
    outputs = (Output("model", "MODEL"),)

    def run(self, ctx: Context, model: ModelRecipe, mode: str, fullgraph: bool, dynamic: bool) -> dict[str, Any]:
        # Scales written in place need tensors, which hot-swap preparation makes: prepare for it.
        return {"model": replace(model.prepared_for_hotswap(), compile=Compile(mode, fullgraph, dynamic))}


class ScaleSchedule(Node):
    type = "ScaleSchedule"
    version = "1.0.0"
    category = "lora"
    description = ("A per-step UNet scale for one adapter slot, applied by Sample at every step "
                   "(constant, linear, cosine, keyframes, or a ramp then hold).")
    inputs = (Input("model", "MODEL"),
              Input("slot", "STRING", default=""),
              Input("kind", "COMBO", default="ramp_hold", choices=schedules.KINDS),
              Input("start", "FLOAT", default=1.5, min=-10.0, max=10.0, step=0.05),
              Input("end", "FLOAT", default=0.7, min=-10.0, max=10.0, step=0.05),
              Input("ramp_steps", "INT", default=20, min=1, max=1000),
              Input("hold", "FLOAT", default=0.2, min=-10.0, max=10.0, step=0.05),
              Input("keyframes", "STRING", default='{"0": 1.0}', description='JSON {step: scale}'))
    outputs = (Output("model", "MODEL"), Output("scales", "STRING"))

    @classmethod
    def check(cls, literals: dict[str, Any], settings: Any) -> list[tuple[str | None, str]]:
        if literals.get("kind") != "keyframes":
            return []
        try:
            schedules.parse_keyframes(literals.get("keyframes", ""))
        except ValueError as exc:
            return [("keyframes", str(exc))]
        return []

    def run(self, ctx: Context, model: ModelRecipe, slot: str, kind: str, start: float, end: float,
            ramp_steps: int, hold: float, keyframes: str) -> dict[str, Any]:
        live = model.live()
        slot = slot or (next(iter(live)) if len(live) == 1 else "")
        if slot not in live:
            raise NodeFailure(f"no active adapter in slot {slot!r} (active: {', '.join(live) or 'none'})",
                              "slot", "unknown_slot")
        try:
            spec = schedules.spec(kind, start, end, ramp_steps, hold, keyframes)
        except ValueError as exc:
            raise NodeFailure(str(exc), "keyframes", "invalid_value") from None
        others = tuple((s, v) for s, v in model.schedules if s != slot)
        recipe = replace(model, schedules=(*others, (slot, spec)))
        return {"model": recipe, "scales": json.dumps(schedules.preview(spec))}


NODES: list[type[Node]] = [LoadLoRA, FuseLoRA, HotswapLoRA, CompileModel, ScaleSchedule]
