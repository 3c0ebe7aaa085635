"""The reconciler: make a resident diffusers pipeline match a `ModelRecipe` in the fewest steps.

The invariant (tested by property tests over random recipe sequences): whatever state the
pipeline was in, after `reconcile(resident, recipe)` its output equals that of a fresh pipeline
built from the recipe alone, and exactly the recipe's live adapters exist on its modules.

Transitions, cheapest first:
- a strength or block-scale change: `set_adapters` only;
- a new adapter: `load_lora_weights` into its slot; a removed one: `delete_adapters`;
  a slot whose file changed: delete, then load;
- any change to what is fused: restore the base weights from a snapshot taken before the first
  fuse (bitwise, in every dtype; diffusers' `unfuse_lora` is neither exact nor possible after
  the fused adapters are unloaded), then fuse the new groups.

diffusers' LoRA loading is not atomic (see shared/notes/diffusers-peft.md): a failed transition
resets the pipeline to its base weights and rebuilds the last good recipe, then re-raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from nodes.recipe import Adapter, ModelRecipe


class ReconcileError(Exception):
    """A transition failed; the pipeline is back in its last good state. Names the LoRA at fault."""


@dataclass
class Resident:
    """A live pipeline, the recipe it currently realizes, and the base weights fusing replaced."""

    pipe: Any
    applied: ModelRecipe
    # component -> module name -> original (weight, bias) of the layers a fuse has modified
    snapshot: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = field(default_factory=dict)
    broken: bool = False  # a failed transition could not be rolled back
    scheduler_config: dict[str, Any] = field(default_factory=dict)  # the checkpoint's own, for Sample

    @property
    def components(self) -> list[str]:
        """The components LoRAs can live in: unet and the text encoders this pipeline has."""
        return [c for c in self.pipe._lora_loadable_modules if getattr(self.pipe, c, None) is not None]

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return tuple(c for c in self.components if c.startswith("text_encoder"))


def reconcile(resident: Resident, target: ModelRecipe) -> list[str]:
    """Bring the pipeline to `target`; returns the actions taken (for events, tests, benchmarks)."""
    if resident.applied.base != target.base:
        raise ValueError("a resident pipeline only reconciles recipes of its own checkpoint")
    previous = resident.applied
    try:
        actions = _transition(resident, target)
    except Exception as exc:
        try:
            _reset(resident)
            _transition(resident, previous)
            resident.applied = previous
        except Exception:
            resident.broken = True  # the model manager drops it; the next run loads it afresh
        if isinstance(exc, ReconcileError):
            raise
        raise ReconcileError(f"{type(exc).__name__}: {exc}") from exc
    resident.applied = target
    return actions


def _transition(resident: Resident, target: ModelRecipe) -> list[str]:
    pipe, actions = resident.pipe, []
    current = resident.applied
    if current.fused_groups() != target.fused_groups():
        if current.fused_groups() or current.live():
            _reset(resident)
            actions.append("restore_base")
        for group, lora_scale in target.fused_groups():
            for adapter in group:
                _load(resident, adapter)
            _activate(resident, group)
            _snapshot(resident)
            pipe.fuse_lora(components=resident.components, lora_scale=lora_scale, adapter_names=[a.slot for a in group])
            _unload_all(pipe)  # the merged weights stay; the LoRA layers go
            actions.append("fuse")
        live: dict[str, Adapter] = {}
    else:
        live = current.live()
    wanted = target.live()
    for slot, adapter in live.items():
        if slot not in wanted or not adapter.same_file(wanted[slot]):
            pipe.delete_adapters(slot)
            actions.append(f"delete:{slot}")
    loaded = False
    for slot, adapter in wanted.items():
        if slot not in live or not live[slot].same_file(adapter):
            _load(resident, adapter)
            actions.append(f"load:{slot}")
            loaded = True
    if wanted and (loaded or list(wanted.values()) != list(live.values())):
        _activate(resident, tuple(wanted.values()))
        actions.append("set_adapters")
    elif not wanted and live:
        _unload_all(pipe)  # no adapters left: drop the empty LoRA wrappers too
    return actions


def _load(resident: Resident, adapter: Adapter) -> None:
    try:
        resident.pipe.load_lora_weights(adapter.path, adapter_name=adapter.slot)
    except Exception as exc:
        name = adapter.path.rsplit("/", 1)[-1]
        raise ReconcileError(
            f"LoRA {name!r} (slot {adapter.slot!r}) cannot be loaded into this model: {type(exc).__name__}: {exc}"
        ) from exc


def _activate(resident: Resident, adapters: tuple[Adapter, ...]) -> None:
    # Each load activates only the new adapter, so the whole stack is set after every change.
    resident.pipe.set_adapters([a.slot for a in adapters], [a.weights(resident.text_encoders) for a in adapters])


def _unload_all(pipe: Any) -> None:
    pipe.unload_lora_weights()
    pipe._merged_adapters = set()  # diffusers keeps the names of unloaded fused adapters here


def _lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if hasattr(module, "base_layer") and hasattr(module, "lora_A")
    ]


def _snapshot(resident: Resident) -> None:
    """Keep the original weights of every layer about to be fused into, once per pipeline."""
    for component in resident.components:
        saved = resident.snapshot.setdefault(component, {})
        for name, layer in _lora_layers(getattr(resident.pipe, component)):
            if name not in saved:
                base = layer.base_layer
                bias = getattr(base, "bias", None)
                saved[name] = (
                    base.weight.detach().to("cpu", copy=True),
                    None if bias is None else bias.detach().to("cpu", copy=True),
                )


def _reset(resident: Resident) -> None:
    """Back to the checkpoint's weights: no LoRA layers, fused layers restored bitwise."""
    _unload_all(resident.pipe)
    with torch.no_grad():
        for component, layers in resident.snapshot.items():
            model = getattr(resident.pipe, component)
            for name, (weight, bias) in layers.items():
                module = model.get_submodule(name)
                module.weight.copy_(weight)
                if bias is not None:
                    module.bias.copy_(bias)
    resident.applied = replace(resident.applied, ops=())
