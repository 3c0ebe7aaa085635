"""The reconciler: make a resident diffusers pipeline match recipes in the fewest steps.

A resident has two targets that reconcile independently, so a MODEL and a CLIP carrying different
LoRA stacks never undo each other's work: the denoiser (`part="unet"`, MODEL recipes) and the text
encoders (`part="clip"`, CLIP recipes). The denoiser is the pipeline's `unet` or, for SD3 and Flux, its
`transformer` (the part keeps the name "unet"). A LoRA file's layers are loaded into the part's components
only, with diffusers' own `load_lora_into_unet` / `load_lora_into_transformer` / `load_lora_into_text_encoder`.

The invariant (tested by property tests over random recipe sequences): whatever state the
pipeline was in, after `reconcile(resident, recipe)` the part's output equals that of a fresh
pipeline built from the recipe alone, and exactly the recipe's live adapters exist on its modules.

Transitions, cheapest first:
- a strength or block-scale change: new scales only, written in place into the layers found once per
  load (`Part.layouts`): no module walks, no `set_adapters`;
- a new file in an existing slot: an in-place hot-swap (the denoiser, UNet or transformer) when the pipeline was
  prepared for it and the file fits the slot (denoiser only, rank within the target, a subset of its layers),
  else delete and load; a new adapter: a load; a removed one: a delete. A hot-swap copies the file's
  slot-ready tensors from the LoRA cache (`nodes/engine/lora_cache.py`) into the slot's padded weights
  in one batched copy; only files the cache cannot prepare go through diffusers' `hotswap=True`;
- any change to what is fused, or a larger hot-swap rank: restore the part's base weights from a
  snapshot taken before the first fuse (bitwise, in every dtype; diffusers' `unfuse_lora` is neither
  exact nor possible after the fused adapters are unloaded), then rebuild;
- compile settings: `module.compile()` in place, so adapters stay visible to diffusers.

Scales are written by us, not left to `set_adapters`: a hot-swap does not update PEFT's `r` and
`lora_alpha`, so `set_adapters` would scale a swapped adapter with its predecessor's alpha/rank,
and it replaces the scaling tensors that hot-swap preparation creates (a recompile on a compiled
model). We snapshot each layer's scaling right after every (hot-)load and write base × weight,
in place (`fill_`) where the scaling is a tensor. That also makes per-step schedules free.

diffusers' LoRA loading is not atomic (see shared/notes/diffusers-peft.md): a failed transition
resets the part to its base weights and rebuilds its last good recipe, then re-raises.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from peft.utils.hotswap import prepare_model_for_compiled_hotswap

from nodes.engine import in_place, ip_adapter, lora_cache, lora_files
from nodes.engine.recipe import Adapter, Compile, ModelRecipe
from nodes.engine.resident import Resident, write_scale

# What diffusers says of a file with no layers for one of the components: the file's layers are checked
# against the model's before loading (nodes/engine/lora_match.py), so this says nothing wrong.
_HARMLESS = ("No LoRA keys associated to",)


def peft_name(slot: str) -> str:
    """The adapter name PEFT sees for a slot.

    PEFT's hot-swap finds an adapter's weights by substring (`adapter_name in key`), so a slot
    called `a` would match every key containing an "a" and zero other adapters' layers. Slots are
    [A-Za-z0-9_]; wrapped in dashes, no name is a substring of another name or of a module path.
    """
    return f"s-{slot}-"


class ReconcileError(Exception):
    """A transition failed; the pipeline is back in its last good state. Names the LoRA at fault."""


def reconcile(resident: Resident, target: ModelRecipe) -> list[str]:
    """Bring the target's part of the pipeline to `target`; returns the actions taken (events, tests, benchmarks)."""
    part = resident.parts[target.part]
    if part.applied.base != target.base:
        raise ValueError("a resident pipeline only reconciles recipes of its own checkpoint")
    previous = part.applied
    try:
        actions = _transition(resident, target)
    except Exception as exc:
        try:
            _reset(resident, target.part)
            _transition(resident, previous)
        except Exception:
            resident.broken = True  # the model manager drops it; the next run loads it afresh
        if isinstance(exc, ReconcileError):
            raise
        raise ReconcileError(f"{type(exc).__name__}: {exc}") from exc
    return actions


def _transition(resident: Resident, target: ModelRecipe) -> list[str]:
    actions = _lora_transition(resident, target)
    if target.part == "unet" and resident.denoiser == "unet":  # after the LoRAs: a restore_base unloads it
        actions += ip_adapter.transition(resident, target.ip_adapter)
    return actions


def _lora_transition(resident: Resident, target: ModelRecipe) -> list[str]:
    done = in_place.transition(resident, target)
    if done is not None:
        return done
    pipe, actions, which = resident.pipe, [], target.part
    part = resident.parts[which]
    if which == "unet" and target.hotswap_rank > resident.hotswap_rank:
        if part.applied.ops:
            _reset(resident, which)
            actions.append("restore_base")
        # Must come before the first adapter is loaded; it pads every later LoRA to this rank.
        pipe.enable_lora_hotswap(target_rank=target.hotswap_rank)
        resident.hotswap_rank = target.hotswap_rank
        actions.append(f"prepare_hotswap:{target.hotswap_rank}")
    current = part.applied
    if current.fused_groups() != target.fused_groups():
        if current.ops:
            _reset(resident, which)
            actions.append("restore_base")
        for group, lora_scale in target.fused_groups():
            if not any([_load(resident, which, adapter) for adapter in group]):
                continue  # none of the group's files has layers in this part
            _activate(resident, which, group, ())
            _snapshot(resident, which)
            pipe.fuse_lora(components=resident.components(which), lora_scale=lora_scale,
                           adapter_names=[peft_name(a.slot) for a in group])
            _unload_all(resident, which)  # the merged weights stay; the LoRA layers go
            actions.append("fuse")
        live: dict[str, Adapter] = {}
    else:
        live = current.live()
    wanted = target.live()
    swaps = {slot for slot, a in wanted.items() if slot in live and not a.same_file(live[slot])
             and which == "unet" and _swappable(resident, slot, a)}
    for slot, adapter in live.items():
        if slot not in wanted or (not adapter.same_file(wanted[slot]) and slot not in swaps):
            if _delete(resident, which, slot):
                actions.append(f"delete:{slot}")
    changed = False
    for slot, adapter in wanted.items():
        if slot in swaps:
            in_place.swap(resident, adapter)
            actions.append(f"hotswap:{slot}")
            changed = True
        elif slot not in live or not live[slot].same_file(adapter):
            if _load(resident, which, adapter):
                actions.append(f"load:{slot}")
            changed = True
    if wanted and (changed or list(wanted.values()) != list(live.values()) or target.schedules != current.schedules):
        _activate(resident, which, tuple(wanted.values()), target.schedules)
        if any(part.base_scaling.values()):
            actions.append("scales")
    elif not wanted and live:
        _unload_all(resident, which)  # no adapters left: drop the empty LoRA wrappers too
    if which == "unet" and target.compile != resident.compiled:
        _compile(resident, target.compile)
        actions.append("compile" if target.compile else "uncompile")
    part.applied = target
    return actions


def _swappable(resident: Resident, slot: str, adapter: Adapter) -> bool:
    """Can diffusers hot-swap this file into the slot without failing half way (see the notes)?

    Only a UNet-only file, of a rank within the preparation, whose layers are the slot's or a subset, as
    diffusers' own key conversion names them, and no DoRA on either side (diffusers cannot swap magnitudes,
    and the LoRA cache's in-place copy has none).
    """
    if not resident.hotswap_rank:
        return False
    family, config = resident.applied.family, resident.unet_config
    layers = lora_files.layers(adapter.path, adapter.fingerprint, family, config)
    unet = layers.get(resident.denoiser, {})
    current = resident.parts["unet"].applied.live().get(slot)
    for file in (adapter, current) if current is not None else (adapter,):
        if any(layer.dora for part in lora_files.layers(file.path, file.fingerprint, family, config).values()
               for layer in part.values()):
            return False
    return (set(layers) == {resident.denoiser} and max(layer.rank for layer in unet.values()) <= resident.hotswap_rank
            and unet.keys() <= resident.parts["unet"].slot_targets.get(slot, frozenset()))


def _load(resident: Resident, which: str, adapter: Adapter, hotswap: bool = False) -> bool:
    """Load a file's layers for one part into that part's components only; False if it has none there."""
    pipe, part, name = resident.pipe, resident.parts[which], peft_name(adapter.slot)
    file_name = adapter.path.rsplit("/", 1)[-1]
    components = resident.components(which)
    layers = lora_files.layers(adapter.path, adapter.fingerprint, resident.applied.family, resident.unet_config)
    try:
        if any(c in layers for c in components):
            with _library_warnings() as warned:
                state, alphas, metadata = _state_dict(resident, adapter)
                common = {"network_alphas": alphas, "adapter_name": name, "_pipeline": pipe, "metadata": metadata,
                          "low_cpu_mem_usage": True}
                if which == "unet":
                    _load_into_denoiser(resident, state, hotswap, common)
                for component in components if which == "clip" else ():
                    if component in layers:
                        pipe.load_lora_into_text_encoder(state, text_encoder=getattr(pipe, component),
                                                         prefix=component, lora_scale=pipe.lora_scale, **common)
            warned = [w for w in warned if not w.startswith(_HARMLESS)]
            if warned:
                raise ReconcileError(f"LoRA {file_name!r} (slot {adapter.slot!r}) would load inexactly: {warned[0]}")
        mine = [(component, module, layer) for component, module, layer in _lora_layers(resident, which)
                if name in layer.scaling]
        if resident.hotswap_rank and not hotswap and which == "unet" and mine:
            # diffusers pads and tensorizes only the first adapter loaded after enable_lora_hotswap;
            # every adapter of a prepared pipeline needs it to be swapped or scheduled in place.
            prepare_model_for_compiled_hotswap(getattr(pipe, resident.denoiser), target_rank=resident.hotswap_rank,
                                               check_compiled="ignore")
    except ReconcileError:
        raise
    except Exception as exc:
        raise ReconcileError(f"LoRA {file_name!r} (slot {adapter.slot!r}) cannot be loaded into this model: "
                             f"{type(exc).__name__}: {exc}") from exc
    part.layouts.clear()  # a load re-pads every prepared slot's weights (new tensors)
    if not hotswap:
        part.slot_targets[adapter.slot] = frozenset(module for component, module, _ in mine
                                                    if component == resident.denoiser)
    # Right after a (hot-)load a layer's scaling is the file's own alpha/rank: keep it.
    part.base_scaling[adapter.slot] = {(component, module): float(layer.scaling[name])
                                       for component, module, layer in mine}
    return bool(mine)


def _state_dict(resident: Resident, adapter: Adapter) -> tuple[dict[str, Any], Any, Any]:
    """diffusers' `lora_state_dict` (its key conversion) as (state, network alphas, metadata), from the LoRA cache's
    read of the file; the SD1.x/SDXL formats diffusers does not load exactly rewritten first (`lora_convert`)."""
    return lora_cache.CACHE.converted(type(resident.pipe), adapter.path, adapter.fingerprint,
                                      **conversion_kwargs(resident))


def conversion_kwargs(resident: Resident) -> dict[str, Any]:
    """How this resident's family converts a file (`LoraCache.converted`'s arguments beside the file)."""
    family = resident.applied.family
    if family in ("sd3", "flux"):
        return {"family": family}
    return {"family": family, "rewrite": resident.unet_config,
            **({"unet_config": resident.pipe.unet.config} if family == "sdxl" else {})}


def _load_into_denoiser(resident: Resident, state: dict[str, Any], hotswap: bool, common: dict[str, Any]) -> None:
    """diffusers' `load_lora_into_unet` or `load_lora_into_transformer`, with the arguments this family's takes
    (SD3's takes no network alphas: its converted state dicts fold them in)."""
    import inspect

    pipe, name = resident.pipe, resident.denoiser
    load = getattr(pipe, f"load_lora_into_{name}")
    accepted = inspect.signature(load).parameters
    kwargs = {k: v for k, v in common.items() if k in accepted}
    load(state, **{name: getattr(pipe, name)}, hotswap=hotswap, **kwargs)


@contextmanager
def _library_warnings() -> Iterator[list[str]]:
    """Collect what diffusers and PEFT warn while loading: a dropped key or an ignored value is an error here."""
    warned: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warned.append(record.getMessage())

    loggers = [logging.getLogger("diffusers"), logging.getLogger("peft")]
    saved = [(logger.level, logger.handlers, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.handlers, logger.propagate = [Collect(logging.WARNING)], False
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # PEFT warns on every second adapter loaded into a model; stacking adapters is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute in the model")
            yield warned
        warned.extend(str(w.message) for w in caught)
    finally:
        for logger, (level, handlers, propagate) in zip(loggers, saved, strict=True):
            logger.setLevel(level)
            logger.handlers, logger.propagate = handlers, propagate


def _delete(resident: Resident, which: str, slot: str) -> bool:
    """Delete a slot's layers from one part's components (the other part is untouched); False if it had none."""
    from diffusers.utils import delete_adapter_layers

    name, deleted = peft_name(slot), False
    for component in resident.components(which):
        model = getattr(resident.pipe, component)
        if name in (getattr(model, "peft_config", None) or {}):
            if component == resident.denoiser:
                model.delete_adapters([name])  # also forgets its config, as diffusers' pipeline call does
            else:
                delete_adapter_layers(model, name)
            deleted = True
    part = resident.parts[which]
    part.base_scaling.pop(slot, None)
    part.slot_targets.pop(slot, None)
    part.layouts.clear()
    return deleted


def _activate(resident: Resident, which: str, adapters: tuple[Adapter, ...],
              scheduled: tuple[tuple[str, str], ...]) -> None:
    """Activate the stack and write every layer's scale: the file's own alpha/rank × the recipe's weight.

    `set_adapters` would only activate: its block-wise scales leave layers outside the attention blocks at
    1.0 and fail on LoRAs for conv_in or time_embedding, so weights come from `Adapter.weight` for every layer.
    """
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    part = resident.parts[which]
    layers = _lora_layers(resident, which)
    tensors = {(component, name, slot): value for component, name, layer in layers
               for slot, value in layer.scaling.items() if isinstance(value, torch.Tensor)}
    for component in resident.components(which):
        model = getattr(resident.pipe, component)
        present = getattr(model, "peft_config", None) or {}
        names = [peft_name(a.slot) for a in adapters if peft_name(a.slot) in present]
        if names:
            set_weights_and_activate_adapters(model, names, [1.0] * len(names))
    schedule_slots = {slot for slot, _ in scheduled}
    part.unit_scaling = {slot: [] for slot in schedule_slots}
    for component, module, layer in layers:
        for adapter in adapters:
            name = peft_name(adapter.slot)
            if name not in layer.scaling:
                continue
            scheduled_here = adapter.slot in schedule_slots and component == resident.denoiser
            weight = adapter.weight(component, module, 1.0 if scheduled_here else None)
            value = part.base_scaling[adapter.slot][(component, module)] * weight
            layer.scaling[name] = tensors.get((component, module, name), layer.scaling[name])
            write_scale(layer, name, value)
            if scheduled_here:
                part.unit_scaling[adapter.slot].append((layer, name, value))


def _compile(resident: Resident, settings: Compile | None) -> None:
    denoiser = getattr(resident.pipe, resident.denoiser)
    if settings is None:
        denoiser._compiled_call_impl = None  # what nn.Module.compile() set; without it, eager again
    else:
        # In place: `pipe.unet = torch.compile(pipe.unet)` would hide the adapters from diffusers.
        denoiser.compile(mode=None if settings.mode == "default" else settings.mode,
                         fullgraph=settings.fullgraph, dynamic=settings.dynamic)
    resident.compiled = settings
    resident.compile_seen = False


def _unload_all(resident: Resident, which: str) -> None:
    """Remove every LoRA layer from a part's components, as diffusers' `unload_lora_weights` does for all."""
    from diffusers.utils import recurse_remove_peft_layers

    for component in resident.components(which):
        model = getattr(resident.pipe, component)
        if component == resident.denoiser:
            model.unload_lora()
        else:
            recurse_remove_peft_layers(model)
            if getattr(model, "peft_config", None) is not None:
                del model.peft_config
                model._hf_peft_config_loaded = None
    resident.pipe._merged_adapters = set()  # diffusers keeps the names of unloaded fused adapters here
    part = resident.parts[which]
    part.base_scaling.clear()
    part.slot_targets.clear()
    part.layouts.clear()


def _lora_layers(resident: Resident, which: str) -> list[tuple[str, str, Any]]:
    return [(component, name, module) for component in resident.components(which)
            for name, module in getattr(resident.pipe, component).named_modules() if isinstance(module, LoraLayer)]


def _snapshot(resident: Resident, which: str) -> None:
    """Keep the original weights of every layer about to be fused into, once per pipeline."""
    for component, name, layer in _lora_layers(resident, which):
        saved = resident.snapshot.setdefault(component, {})
        if name not in saved:
            base = layer.base_layer
            bias = getattr(base, "bias", None)
            saved[name] = (base.weight.detach().to("cpu", copy=True),
                           None if bias is None else bias.detach().to("cpu", copy=True))


def _reset(resident: Resident, which: str) -> None:
    """Back to the checkpoint's weights in one part: no LoRA layers or IP-Adapter, fused layers restored bitwise."""
    _unload_all(resident, which)
    if which == "unet" and resident.denoiser == "unet":
        ip_adapter.unload(resident)
    with torch.no_grad():
        for component in resident.components(which):
            model = getattr(resident.pipe, component)
            for name, (weight, bias) in resident.snapshot.get(component, {}).items():
                module = model.get_submodule(name)
                module.weight.copy_(weight)
                if bias is not None:
                    module.bias.copy_(bias)
    part = resident.parts[which]
    # Compile settings and hot-swap preparation survive a reset: they are not weights.
    part.applied = replace(part.applied.bare(), hotswap_rank=resident.hotswap_rank if which == "unet" else 0,
                           compile=resident.compiled if which == "unet" else None)
