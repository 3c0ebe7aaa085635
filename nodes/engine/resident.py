"""A resident pipeline and what realizing recipes on it must remember, per part.

The model manager keeps `Resident`s (`memory`, `move`, `release` are what it needs); the reconciler
(`nodes/engine/reconcile.py`) changes them. A resident has two parts that reconcile independently:
the denoiser (MODEL recipes) and the text encoders (CLIP recipes).
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from nodes.engine import lora_cache, schedules
from nodes.engine.recipe import Compile, ModelRecipe

Layer = tuple[str, str]  # (component, module name)


@dataclass
class Part:
    """The LoRA state of one target of a resident: the recipe it realizes and what that needs remembered."""

    applied: ModelRecipe
    base_scaling: dict[str, dict[Layer, float]] = field(default_factory=dict)  # slot -> layer -> alpha/r
    slot_targets: dict[str, frozenset[str]] = field(default_factory=dict)  # UNet layers of a slot's first file
    # scheduled slot -> (layer module, PEFT name, its scale at weight 1), written at every step
    unit_scaling: dict[str, list[tuple[Any, str, float]]] = field(default_factory=dict)
    # slot -> where its adapter lives, found once after each load/delete (switches and strengths walk nothing)
    layouts: dict[str, SlotLayout] = field(default_factory=dict)


@dataclass
class SlotLayout:
    """A slot's adapter in one part: its layers, their scaling tensors and (UNet) lora_A/lora_B weights."""

    layers: list[tuple[str, str, Any]]  # (component, module name, PEFT LoraLayer)
    scales: list[torch.Tensor | None]  # per layer: its scaling tensor, None where the scaling is a float
    weights: list[tuple[str, torch.Tensor, torch.Tensor]]  # UNet layers: (module name, lora_A, lora_B weight)


@dataclass
class Resident:
    """A live pipeline and, per part (denoiser, text encoders), the recipe it currently realizes."""

    pipe: Any
    parts: dict[str, Part]
    device: str = "cpu"  # where it lives (diffusers' `pipe.device` walks every module to find out)
    # component -> module name -> original (weight, bias) of the layers a fuse has modified
    snapshot: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = field(default_factory=dict)
    broken: bool = False  # a failed transition could not be rolled back
    scheduler_config: dict[str, Any] = field(default_factory=dict)  # the checkpoint's own, for Sample
    hotswap_rank: int = 0  # the target rank `enable_lora_hotswap` was called with; 0 if never
    compiled: Compile | None = None
    compile_seen: bool = False  # a compiled forward has run (so new graphs are recompiles)

    offload: str = ""  # "", or how a model larger than its budget runs: "model" / "group" (GPU), "disk" (CPU)
    offload_dir: str | None = None  # where "disk" offloading keeps the weights, once applied
    text_encoder_device: str | None = None  # the text encoders' own device (`--text-encoder-device`), if set
    ip_adapter: Any = None  # the recipe.IPAdapter loaded into the UNet (engine/ip_adapter.py), or None
    # The last `memory()` / `component_memory()` and the state they were measured in (`_state`): the manager asks
    # after every use, and a measure walks every module (≈5 ms on the tiny model), so it is redone only on change.
    _measured: dict[str, tuple[Any, Any]] = field(default_factory=dict, repr=False)

    @classmethod
    def fresh(cls, pipe: Any, checkpoint: ModelRecipe, **kwargs: Any) -> Resident:
        """A resident for a pipeline just loaded from `checkpoint` (its LoRA ops are ignored)."""
        bare = checkpoint.bare()
        return cls(pipe, {"unet": Part(replace(bare, part="unet")), "clip": Part(replace(bare, part="clip"))},
                   **kwargs)

    @property
    def applied(self) -> ModelRecipe:
        """The MODEL recipe the denoiser realizes."""
        return self.parts["unet"].applied

    def _state(self) -> tuple[Any, ...]:
        """What the bytes per device follow: the recipes realized (LoRAs, fuses, compile), the adapters and
        snapshots held, and where everything lives."""
        return (tuple((name, part.applied) for name, part in self.parts.items()), self.ip_adapter, self.hotswap_rank,
                self.compiled, self.device, self.text_encoder_device, self.offload, self.offload_dir,
                sum(len(layers) for layers in self.snapshot.values()))

    def _remembered(self, what: str, measure: Any) -> Any:
        state = self._state()
        hit = self._measured.get(what)
        if hit is None or hit[0] != state:
            hit = self._measured[what] = (state, measure())
        return hit[1]

    def memory(self) -> dict[str, int]:
        """Bytes of tensors per device: the pipeline's modules (shared storage counted once) and snapshots."""
        return dict(self._remembered("memory", self._memory))

    def _memory(self) -> dict[str, int]:
        seen: set[tuple[str, int]] = set()
        totals: dict[str, int] = {}
        tensors = [t for layers in self.snapshot.values() for pair in layers.values() for t in pair if t is not None]
        if self.offload_dir is None:  # disk-offloaded modules hold placeholders; the weights are in files
            for module in self.pipe.components.values():
                if isinstance(module, torch.nn.Module):
                    tensors.extend(module.parameters())
                    tensors.extend(module.buffers())
        for tensor in tensors:
            storage = tensor.untyped_storage()
            where = str(tensor.device)
            if where == "meta" or (where, storage.data_ptr()) in seen:
                continue
            seen.add((where, storage.data_ptr()))
            totals[where] = totals.get(where, 0) + storage.nbytes()
        return totals

    def component_memory(self) -> list[dict[str, Any]]:
        """Per component (unet or transformer, text encoders, vae): its dtype and bytes of tensors per device."""
        return list(self._remembered("components", self._component_memory))

    def _component_memory(self) -> list[dict[str, Any]]:
        listed = []
        for name, module in self.pipe.components.items():
            if isinstance(module, torch.nn.Module):
                totals: dict[str, int] = {}
                on_disk = self.offload_dir is not None  # as in `memory`: the weights are in files
                for tensor in [] if on_disk else [*module.parameters(), *module.buffers()]:
                    if tensor.device.type != "meta":
                        totals[str(tensor.device)] = totals.get(str(tensor.device), 0) + tensor.nbytes
                dtype = next(module.parameters(), torch.empty(0)).dtype
                listed.append({"name": name, "dtype": str(dtype).removeprefix("torch."), "bytes": totals})
        return listed

    def move(self, device: str) -> None:
        """Move to `device` (eviction to the CPU, and back); text encoders with a device of their own stay there."""
        if self.text_encoder_device is None:
            self.pipe.to(device)
        else:
            for name, module in self.pipe.components.items():
                if isinstance(module, torch.nn.Module) and not name.startswith("text_encoder"):
                    module.to(device)
        self.device = device
        for part in self.parts.values():
            part.layouts.clear()

    def release(self) -> None:
        if self.offload_dir is not None:
            shutil.rmtree(self.offload_dir, ignore_errors=True)
            self.offload_dir = None
        self.pipe = None
        self.snapshot.clear()
        for part in self.parts.values():
            part.unit_scaling.clear()

    def components(self, part: str) -> list[str]:
        """The modules a part's LoRAs live in: the denoiser, or the text encoders this pipeline has."""
        loadable = [c for c in self.pipe._lora_loadable_modules if getattr(self.pipe, c, None) is not None]
        return [c for c in loadable if c.startswith("text_encoder") == (part == "clip")]

    @functools.cached_property
    def denoiser(self) -> str:
        """The pipeline attribute holding the denoiser: "unet", or "transformer" for SD3 and Flux."""
        return "transformer" if getattr(self.pipe, "transformer", None) is not None else "unet"

    @functools.cached_property
    def unet_config(self) -> str:
        """The denoiser's config as JSON: how diffusers maps SGM block names in Kohya files for this model."""
        return json.dumps(dict(getattr(self.pipe, self.denoiser).config), sort_keys=True, default=str)

    def set_step(self, step: int) -> None:
        """Write the scheduled scales for sampling step `step` (0-based), in place."""
        unet = self.parts["unet"]
        tensors, values = [], []
        for slot, spec in unet.applied.schedules:
            scale = schedules.scale_at(spec, step)
            for layer, name, unit in unet.unit_scaling.get(slot, ()):
                current = layer.scaling[name]
                if isinstance(current, torch.Tensor):
                    tensors.append(current)
                    values.append(unit * scale)
                else:
                    layer.scaling[name] = unit * scale
        lora_cache.write_scales(tensors, values)  # one batched write (a GPU: 2 launches, not one per layer)


def write_scale(layer: Any, name: str, value: float) -> None:
    """Set a LoRA layer's scale for one adapter; in place where it is a tensor (hot-swap preparation makes it
    one), so a compiled graph keeps reading the same tensor."""
    current = layer.scaling[name]
    if isinstance(current, torch.Tensor):
        current.fill_(value)
    else:
        layer.scaling[name] = value
