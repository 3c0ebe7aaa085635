"""In-place transitions: a LoRA switch or a strength change without new layers, at the speed of a copy.

When a recipe differs from what a part realizes only in its adapters' strengths and block scales, or in the
file of a slot prepared for hot-swap, nothing structural changes: `transition` writes the new scales into the
slot's scaling tensors (one batched write) and copies swapped files' slot-ready tensors from the LoRA cache
(`nodes/engine/lora_cache.py`) into the slot's padded lora_A/lora_B weights (one batched copy). Where a slot's
adapter lives is found once after each load or delete (`slot_layout`), so no switch walks the modules, converts a
state dict or calls `set_adapters`. Everything else goes through the reconciler's general transition
(`nodes/engine/reconcile.py`), which also uses `swap` for its hot-swaps.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.utils.hotswap import CONFIG_KEYS_TO_CHECK
from peft.utils.peft_types import PeftType

from nodes.engine import lora_cache
from nodes.engine import reconcile as r
from nodes.engine.recipe import Adapter, ModelRecipe
from nodes.engine.resident import Resident, SlotLayout


def transition(resident: Resident, target: ModelRecipe) -> list[str] | None:
    """New strengths, block scales or swappable files in the same slots, done in place; None for anything else.

    A swap is `swap`'s batched copy; a strength writes each of the slot's scalings, from lists found once per
    load (`slot_layout`): no module walks, no `set_adapters`, whose activation is unchanged.
    """
    which, part = target.part, resident.parts[target.part]
    current = part.applied
    unet_changes = which == "unet" and (target.hotswap_rank > resident.hotswap_rank
                                        or target.compile != resident.compiled)
    if unet_changes or target.fused_groups() != current.fused_groups() or target.schedules != current.schedules:
        return None
    live, wanted = current.live(), target.live()
    changed = [slot for slot, adapter in wanted.items() if adapter != live.get(slot)]
    if not changed or list(live) != list(wanted):
        return None
    swaps = [slot for slot in changed if not wanted[slot].same_file(live[slot])]
    if swaps and (which != "unet" or not all(r._swappable(resident, slot, wanted[slot]) for slot in swaps)):
        return None
    actions = []
    for slot in swaps:
        swap(resident, wanted[slot])
        actions.append(f"hotswap:{slot}")
    scheduled = {slot for slot, _ in target.schedules}
    for slot in changed:
        rescale(resident, which, wanted[slot], slot in scheduled)
    if any(part.base_scaling.values()):
        actions.append("scales")
    part.applied = target
    return actions


def slot_layout(resident: Resident, which: str, slot: str) -> SlotLayout:
    """Where a slot's adapter lives in a part: found by one module walk after each load or delete, then kept
    (for an offloaded model, found again each time)."""
    part = resident.parts[which]
    layout = part.layouts.get(slot)
    # Offloading hooks may replace parameters as they move them: then look again on every use.
    if layout is None or resident.offload:
        name = r.peft_name(slot)
        layers = [(c, m, layer) for c, m, layer in r._lora_layers(resident, which) if name in layer.scaling]
        scales = [layer.scaling[name] if isinstance(layer.scaling[name], torch.Tensor) else None
                  for _, _, layer in layers]
        weights = [(m, layer.lora_A[name].weight, layer.lora_B[name].weight) for c, m, layer in layers
                   if c == resident.denoiser]
        layout = part.layouts[slot] = SlotLayout(layers, scales, weights)
    return layout


def rescale(resident: Resident, which: str, adapter: Adapter, scheduled: bool) -> None:
    """Write one slot's scales (its files' alpha/rank × the recipe's weight) in place, as `_activate` does."""
    part, name = resident.parts[which], r.peft_name(adapter.slot)
    layout = slot_layout(resident, which, adapter.slot)
    base = part.base_scaling[adapter.slot]
    tensors, values, unit = [], [], []
    for (component, module, layer), tensor in zip(layout.layers, layout.scales, strict=True):
        scheduled_here = scheduled and component == resident.denoiser
        value = base[(component, module)] * adapter.weight(component, module, 1.0 if scheduled_here else None)
        if tensor is None:
            layer.scaling[name] = value
        else:
            tensors.append(tensor)
            values.append(value)
        if scheduled_here:
            unit.append((layer, name, value))
    lora_cache.write_scales(tensors, values)
    if scheduled:
        part.unit_scaling[adapter.slot] = unit


def _check_compatible(slot: Any, new: Any) -> None:
    """PEFT's hot-swap check of two LoraConfigs (`check_hotswap_configs_compatible`), without its deep copies."""
    for key in CONFIG_KEYS_TO_CHECK[PeftType.LORA]:
        if getattr(slot, key, None) != getattr(new, key, None):
            raise ValueError(f"Configs are incompatible: for {key}, {getattr(slot, key, None)} != "
                             f"{getattr(new, key, None)}")


def swap(resident: Resident, adapter: Adapter) -> None:
    """Hot-swap a file into its (prepared) denoiser slot: the cache's slot-ready tensors copied in one batch.

    What diffusers' `load_lora_into_unet` / `load_lora_into_transformer` with `hotswap=True` does, without its
    state-dict conversion, module walks and per-tensor copies on every switch; files the cache cannot prepare
    (not plain LoRA) still go through it.
    """
    pipe, part, name, denoiser = resident.pipe, resident.parts["unet"], r.peft_name(adapter.slot), resident.denoiser
    layout = slot_layout(resident, "unet", adapter.slot)
    if not layout.weights:
        r._load(resident, "unet", adapter, hotswap=True)
        return
    down = layout.weights[0][1]
    family = resident.applied.family
    key = lora_cache.slot_key(adapter.path, adapter.fingerprint, (family, resident.unet_config), name,
                              down.shape[0], down.dtype, down.device)
    ready = lora_cache.CACHE.slot_ready(key)
    if ready is False:  # not cached: read (unless prewarmed) and convert, as strictly as a load
        file_name = adapter.path.rsplit("/", 1)[-1]
        try:
            with r._library_warnings() as warned:
                ready = lora_cache.CACHE.build_slot_ready(key, type(pipe), denoiser, **r.conversion_kwargs(resident))
        except Exception as exc:
            raise r.ReconcileError(f"LoRA {file_name!r} (slot {adapter.slot!r}) cannot be loaded into this model: "
                                   f"{type(exc).__name__}: {exc}") from exc
        warned = [w for w in warned if not w.startswith(r._HARMLESS)]
        if warned:
            raise r.ReconcileError(f"LoRA {file_name!r} (slot {adapter.slot!r}) would load inexactly: {warned[0]}")
    if not isinstance(ready, lora_cache.SlotReady):
        r._load(resident, "unet", adapter, hotswap=True)
        return
    _check_compatible(getattr(pipe, denoiser).peft_config[name], ready.config)
    lora_cache.copy_into(layout.weights, ready)
    part.base_scaling[adapter.slot] = {**part.base_scaling[adapter.slot],
                                       **{(denoiser, module): value for module, value in ready.scaling.items()}}
