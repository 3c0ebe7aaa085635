"""LoRA layers read the way the reconciler loads them, merged into one LoRA, and written as a PEFT file.

`adapter_layers` loads LoRA files with diffusers' own loaders (after `lora_convert`, as the reconciler
does) into the checkpoint's models built on the meta device: no base weights are read, and each PEFT
layer ends up with its real A/B matrices (put back where PEFT leaves them on the meta device) and scaling.
Merging then uses PEFT's own weighted-adapter arithmetic (`LoraModel.add_weighted_adapter`'s per-layer
steps: linear, ties, dare_linear, dare_ties, their SVD variants, and cat), so MergeLoRA gives what
`add_weighted_adapter` gives on the same adapters. A merge is written once as a content-addressed file
(`merged_path`): the recipe then holds a plain adapter of that file, which the reconciler realizes like
any other, from scratch if need be.

`write_lora` writes layers in diffusers/PEFT keys with `lora_adapter_metadata` (every layer padded with
zero ranks to one rank r, alpha r: scale 1, so no pattern is needed), atomically, never over a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from nodes.engine import lora_convert, lora_files

T = TypeVar("T")

_TEXT = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Source:
    path: str
    fingerprint: str
    weight: float


def meta_models(checkpoint: str) -> dict[str, Any]:
    """The checkpoint's UNet and text encoders with every weight on the meta device (configs only)."""
    import transformers
    from diffusers import UNet2DConditionModel

    from nodes.engine.checkpoints import detect_family, read_header
    from nodes.engine.single_file_configs import single_file_config_dir

    path = Path(checkpoint)
    family = detect_family(path)
    folder = path if path.is_dir() else single_file_config_dir(path, read_header(path), family)
    index = json.loads((folder / "model_index.json").read_text())
    with torch.device("meta"):
        models: dict[str, Any] = {"unet": UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(folder / "unet"))}
        for component in _TEXT:
            entry = index.get(component) or [None, None]
            if entry[1]:
                model_class = getattr(transformers, entry[1])
                models[component] = model_class(model_class.config_class.from_pretrained(folder / component))
    return models


def adapter_layers(checkpoint: str, family: str, paths: list[str]) -> dict[str, Any]:
    """The models of `meta_models` with each file loaded as adapter `m0`, `m1`, … (see the module docstring)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline: Any = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    models = meta_models(checkpoint)
    unet = models["unet"]
    unet_config = json.dumps(dict(unet.config), sort_keys=True, default=str)
    kwargs = {"unet_config": unet.config} if family == "sdxl" else {}
    loaded: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for index, path in enumerate(paths):
        name = f"m{index}"
        source = lora_convert.load_source(path, unet_config)
        state, alphas, metadata = pipeline.lora_state_dict(source, return_lora_metadata=True, **kwargs)
        common = {"network_alphas": alphas, "adapter_name": name, "_pipeline": None, "metadata": metadata,
                  "low_cpu_mem_usage": True}
        if any(key.startswith("unet.") for key in state):
            pipeline.load_lora_into_unet(state, unet=unet, **common)
        for component in _TEXT:
            if component in models and any(key.startswith(component + ".") for key in state):
                pipeline.load_lora_into_text_encoder(state, text_encoder=models[component], prefix=component,
                                                     lora_scale=1.0, **common)
        loaded[name] = lora_files.peft_parts(state, Path(path).name)
    for name, parts in loaded.items():  # at the end: loading one adapter moves the others to the meta device
        _fill_meta(models, name, parts)
    return models


def _fill_meta(models: dict[str, Any], name: str, parts: dict[str, dict[str, torch.Tensor]]) -> None:
    """Give adapter `name` its real A/B where PEFT left them on the meta device of their base layers (it does
    for text encoders, and for the first adapter of a UNet), from the same PEFT-keyed tensors it loaded."""
    from peft.tuners.lora import LoraLayer

    for component, model in models.items():
        peft = parts.get(component, {})
        for module, layer in model.named_modules():
            if not isinstance(layer, LoraLayer) or name not in layer.lora_A:
                continue
            for half in ("lora_A", "lora_B"):
                linear = getattr(layer, half)[name]
                if linear.weight.is_meta:
                    key = next(k for k in (f"{module}.{half}.weight", f"text_model.{module}.{half}.weight")
                               if k in peft)
                    linear.weight = torch.nn.Parameter(peft[key].float(), requires_grad=False)


def merge(models: dict[str, Any], weights: list[float], method: str, density: float,
          rank: int, seed: int) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """component -> module -> (A, B) of the merge of adapters m0, m1, … with PEFT's per-layer arithmetic.

    Ranks that differ (or an explicit `rank`) turn linear/ties/dare into their SVD variants at `rank`
    (0: the largest source rank); cat needs no common rank. DARE's random drops use `seed`.
    """
    from peft.tuners.lora import LoraLayer, LoraModel

    names = [f"m{i}" for i in range(len(weights))]
    ranks = {layer.r[n] for model in models.values() for layer in model.modules()
             if isinstance(layer, LoraLayer) for n in names if n in layer.r}
    combination = method
    if method in ("linear", "ties", "dare_linear", "dare_ties") and (rank or len(ranks) > 1):
        combination = "svd" if method == "linear" else f"{method}_svd"
    elif method == "svd":
        combination = "svd"
    new_rank = rank or max(ranks)
    merged: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for component, model in models.items():
            for module, layer in model.named_modules():
                if not isinstance(layer, LoraLayer):
                    continue
                present = [(n, w) for n, w in zip(names, weights, strict=True) if n in layer.lora_A]
                if not present:
                    continue
                adapters, ws = [n for n, _ in present], [w for _, w in present]
                if combination == "cat":
                    a = torch.cat([layer.lora_A[n].weight * w * layer.scaling[n] for n, w in present], dim=0)
                    b = torch.cat([layer.lora_B[n].weight for n, _ in present], dim=1)
                elif combination.endswith("svd"):
                    a, b = _svd(LoraModel, layer, combination, adapters, ws, new_rank, density)
                else:
                    a, b = LoraModel._generalized_task_arithmetic_weighted_adapter(
                        None, combination, adapters, ws, layer, density, "total")
                merged.setdefault(component, {})[module] = (a.detach(), b.detach())
    return merged


def _svd(lora_model: Any, layer: Any, combination: str, adapters: list[str], weights: list[float], rank: int,
         density: float) -> tuple[torch.Tensor, torch.Tensor]:
    base = layer.get_base_layer().weight
    shape = tuple(base.shape)
    rank = min(rank, shape[0], int(torch.tensor(shape[1:]).prod()))
    a_shape, b_shape = (rank, *shape[1:]), (shape[0], rank, *([1, 1] if len(shape) == 4 else []))
    a, b = lora_model._svd_generalized_task_arithmetic_weighted_adapter(
        None, combination, adapters, weights, rank, layer, torch.empty(a_shape), torch.empty(b_shape), density, "total")
    return a.reshape(a_shape), b.reshape(b_shape)


def merged_path(cache: Path, sources: list[Source], method: str, density: float, rank: int, seed: int,
                checkpoint_fingerprint: str) -> Path:
    spec = json.dumps([[s.path, s.fingerprint, s.weight] for s in sources] + [method, density, rank, seed,
                                                                             checkpoint_fingerprint])
    return cache / f"merged-{hashlib.sha256(spec.encode()).hexdigest()[:24]}.safetensors"


def layers_to_state(layers: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]],
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT keys (`unet.<module>.lora_A.weight`) padded to one rank, and diffusers' adapter metadata."""
    rank = max(a.shape[0] for part in layers.values() for a, _ in part.values())
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, Any] = {}
    for component, part in layers.items():
        for module, (a, b) in part.items():
            pad = rank - a.shape[0]
            a = torch.cat([a, a.new_zeros(pad, *a.shape[1:])]) if pad else a
            b = torch.cat([b, b.new_zeros(b.shape[0], pad, *b.shape[2:])], dim=1) if pad else b
            # Files of every tool name the CLIP layers with their `text_model.` level; transformers 5 has none.
            key = module if component == "unet" or module.startswith("text_model.") else f"text_model.{module}"
            tensors[f"{component}.{key}.lora_A.weight"] = a.contiguous()
            tensors[f"{component}.{key}.lora_B.weight"] = b.contiguous()
        metadata.update({f"{component}.r": rank, f"{component}.lora_alpha": rank,
                         f"{component}.target_modules": sorted(part)})
    return tensors, {"lora_adapter_metadata": json.dumps(metadata, sort_keys=True)}


def write_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
               dtype: torch.dtype | None = None) -> None:
    """Write a safetensors file atomically (a temp file in the same folder, then a link); never over a file."""
    if path.exists():
        raise FileExistsError(f"{path.name} already exists; choose another name")
    _write_then(path.parent, path.stem, tensors, metadata, dtype, lambda temp: os.link(temp, path))


def write_numbered_lora(folder: Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                        dtype: torch.dtype | None = None) -> Path:
    """`write_lora` to `folder/{name}_{counter:05}_.safetensors`, numbered as SaveImage's PNGs; returns the path."""
    from nodegraph.naming import link_numbered

    return _write_then(folder, name, tensors, metadata, dtype,
                       lambda temp: link_numbered(temp, folder, name, ".safetensors"))


def _write_then(folder: Path, stem: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                dtype: torch.dtype | None, place: Callable[[Path], T]) -> T:
    """Write the file under a temporary name in `folder`, then `place` it (a link that never replaces a file)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{stem}-", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        save_file({k: v.to(dtype) if dtype else v for k, v in tensors.items()}, temp, metadata=metadata)
        return place(Path(temp))
    finally:
        os.unlink(temp)


def saved_state(models: dict[str, Any], name: str = "m0") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Adapter `name` of `adapter_layers` as PEFT keys, with its LoRA config (ranks and alphas per layer)."""
    from peft.tuners.lora import LoraLayer

    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, Any] = {}
    for component, model in models.items():
        config = (getattr(model, "peft_config", None) or {}).get(name)
        if config is None:
            continue
        for module, layer in model.named_modules():
            if isinstance(layer, LoraLayer) and name in layer.lora_A:
                key = module if component == "unet" or module.startswith("text_model.") else f"text_model.{module}"
                tensors[f"{component}.{key}.lora_A.weight"] = layer.lora_A[name].weight.detach().contiguous()
                tensors[f"{component}.{key}.lora_B.weight"] = layer.lora_B[name].weight.detach().contiguous()
        fields = {"r": config.r, "lora_alpha": config.lora_alpha, "rank_pattern": config.rank_pattern,
                  "alpha_pattern": config.alpha_pattern, "use_rslora": config.use_rslora,
                  "target_modules": sorted(config.target_modules)}
        metadata.update({f"{component}.{k}": v for k, v in fields.items()})
    return tensors, {"lora_adapter_metadata": json.dumps(metadata, sort_keys=True)}
