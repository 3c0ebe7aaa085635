"""Shared by the diffusion benchmarks: interleaved timing, the models they run on, small printing helpers.

Not a benchmark itself. `bench/sample.py` and `bench/lora.py` import it as `common` (running
`python bench/<name>.py` puts `bench/` first on `sys.path`).

Models:
  tiny  the bundled demo models (`nodes.engine.demo_models.make_demo_models`): tiny SD1.5 folder + LoRAs.
  sd15  a full-size SD1.5-architecture pipeline with random weights (UNet ≈860 M parameters,
        SD1.5 VAE, a 12-layer 768-wide CLIP text encoder whose vocabulary is the generated demo
        tokenizer's, so the two agree), saved as a diffusers folder, plus a rank-8 attention LoRA
        (128 layers) in PEFT format with its metadata. ≈4.3 GB on disk; built in ≈1-2 min, or
        reused from `--models-dir`.

Threads: the benchmarks run torch on 1 intra-op thread unless told otherwise (`--threads`). On a 2-core
machine shared with other jobs, 2 threads make every op wait at OpenMP's barrier for whichever thread
another process has descheduled: measured 0.75 s per tiny image on 1 thread against 0.6 s or 12 s
(alternating with the other jobs) on 2. Ratios, which is what these benchmarks report, stay meaningful.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import nodes.engine.pipelines  # noqa: E402, F401  (quiets the libraries' progress bars and notices, as our runtime does)

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

SD15_FOLDER = "bench-sd15-random"  # under <models>/checkpoints/
SD15_LORA = "bench-sd15-attn-r8.safetensors"  # under <models>/loras/
TINY_FOLDER = "tiny-sd15"
TINY_LORA = "tiny-sd15-style.safetensors"
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_SD15_VERSION = "1"  # bump when what build_sd15 writes changes: cached folders are then rebuilt


@dataclass(frozen=True)
class Models:
    """A models folder (checkpoints/, loras/) and the checkpoint and LoRA a benchmark uses in it."""

    root: Path
    checkpoint: str  # name under checkpoints/
    lora: str  # name under loras/

    @property
    def checkpoint_path(self) -> Path:
        return self.root / "checkpoints" / self.checkpoint

    @property
    def lora_path(self) -> Path:
        return self.root / "loras" / self.lora


@contextmanager
def models(size: str, models_dir: str | None) -> Iterator[Models]:
    """The models for `size` in `models_dir` (made there once and kept) or in a temp dir removed after."""
    with _root(models_dir) as root:
        if size == "tiny":
            from nodes.engine.demo_models import make_demo_models

            make_demo_models(root)
            yield Models(root, TINY_FOLDER, TINY_LORA)
        else:
            build_sd15(root)
            yield Models(root, SD15_FOLDER, SD15_LORA)


@contextmanager
def _root(models_dir: str | None) -> Iterator[Path]:
    if models_dir is not None:
        yield Path(models_dir)
        return
    with tempfile.TemporaryDirectory(prefix="nodegraph-bench-") as tmp:
        yield Path(tmp)


def build_sd15(root: Path, seed: int = 0) -> None:
    """Write the full-size random SD1.5 folder and its rank-8 LoRA into `root`, unless already there."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from nodes.engine.clip_tokenizers import demo_clip_tokenizer
    from nodes.engine.single_file_configs import scheduler_config

    folder, lora = root / "checkpoints" / SD15_FOLDER, root / "loras" / SD15_LORA
    marker = folder / ".bench-version"
    if marker.is_file() and marker.read_text() == _SD15_VERSION and lora.is_file():
        return
    started = time.perf_counter()
    print(f"building the full-size random SD1.5 pipeline in {folder.parent} …", flush=True)
    tokenizer = demo_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # UNet2DConditionModel's defaults are SD1.5's blocks; SD1.5 cross-attends to 768-wide CLIP-L states.
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(  # CLIP ViT-L/14's text tower, with the demo tokenizer's vocabulary
                vocab_size=len(tokenizer),
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                projection_dim=768,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        ).eval()
    config = scheduler_config("sd15")
    import diffusers

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=getattr(diffusers, config["_class_name"]).from_config(config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    lora.parent.mkdir(parents=True, exist_ok=True)
    tensors, metadata = attention_lora(pipe, rank=8, alpha=8.0, seed=seed)
    save_file(tensors, lora, metadata=metadata)
    marker.write_text(_SD15_VERSION)
    print(f"  built and saved in {time.perf_counter() - started:.0f} s", flush=True)


def attention_lora(
    pipe: StableDiffusionPipeline, rank: int, alpha: float, seed: int, relative_strength: float = 1.0
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A diffusers/PEFT-format UNet LoRA on every attention projection, with the metadata that keeps its alpha.

    As in `nodes.engine.demo_models.make_lora`: lora_B is not zero (so the LoRA changes the output), and each
    pair moves its layer's weight by `relative_strength` times that weight's own spread at strength 1.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    targets = sorted(
        name
        for name, module in pipe.unet.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name.endswith("." + s) for s in ATTENTION)
    )
    tensors: dict[str, torch.Tensor] = {}
    for target in targets:
        layer = pipe.unet.get_submodule(target)
        down = torch.randn(rank, layer.in_features, generator=generator) / layer.in_features**0.5
        spread = relative_strength * float(layer.weight.detach().std()) * (layer.in_features / rank) ** 0.5
        up = torch.randn(layer.out_features, rank, generator=generator) * spread / (alpha / rank)
        tensors[f"unet.{target}.lora_A.weight"] = down.contiguous()
        tensors[f"unet.{target}.lora_B.weight"] = up.contiguous()
    metadata = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": targets}
    return tensors, {"lora_adapter_metadata": json.dumps(metadata, sort_keys=True)}


def switch_floor(resident: Any, slot: str, files: list[str]) -> tuple[list[Any], list[list[Any]], list[str]]:
    """What a LoRA switch in a prepared slot must at least copy: the slot's lora_A/lora_B weights, and per file
    (each switched in once before, so the LoRA cache holds it) its cached slot-ready tensors in the same order;
    with the files' own keys in that order (for a read + copy floor of files at the slot's rank)."""
    from nodes.engine import in_place, lora_cache
    from nodes.engine.reconcile import peft_name

    layout = in_place.slot_layout(resident, "unet", slot)
    targets = [t for _, down, up in layout.weights for t in (down, up)]
    sources = []
    for path in files:
        found = [value for key, (value, *_) in lora_cache.CACHE._entries.items()
                 if key[0] == "slot" and key[1] == path and key[4] == peft_name(slot)]
        require(len(found) == 1, f"the LoRA cache holds {len(found)} slot-ready entries for {path}")
        sources.append([t for module, _, _ in layout.weights for t in found[0].tensors[module]])
        require(all(s.shape == t.shape for s, t in zip(sources[-1], targets, strict=True)), "shapes differ")
    keys = [f"unet.{module}.lora_{ab}.weight" for module, _, _ in layout.weights for ab in "AB"]
    return targets, sources, keys


_MANAGERS: dict[str, Any] = {}


def lora_cache_on(device: str, cache: Any = None) -> Any:
    """`cache` (default: a new, empty one) counted in a model manager for `device` with the default budgets, as a
    server's is: for a slot on a GPU its entries live there when the VRAM budget has room, else in pinned memory."""
    from nodegraph.models import ModelManager
    from nodes.engine.lora_cache import LoraCache

    manager = _MANAGERS.setdefault(device, ModelManager(device=device))  # kept: the cache holds it weakly
    cache = cache if cache is not None else LoraCache()
    cache.attach(manager)
    return cache


def synchronized(cases: dict[str, Callable[[], Any]], device: str) -> dict[str, Callable[[], Any]]:
    """The cases, each waiting for the GPU's work to finish (so wall times include it) on a CUDA device."""
    if not device.startswith("cuda"):
        return cases
    import torch

    def wait(case: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            result = case()
            torch.cuda.synchronize()
            return result

        return run

    return {name: wait(case) for name, case in cases.items()}


# ---------------------------------------------------------------------------------------------- timing


def interleaved(
    cases: dict[str, Callable[[], Any]], repeats: int, after: dict[str, Callable[[], Any]] | None = None
) -> dict[str, list[float]]:
    """Wall seconds of each case, `repeats` times, the cases taking turns (so noise from other
    processes on the machine falls on all of them alike); the order rotates every round.
    `after[name]`, if given, runs untimed right after each call of that case (to undo it)."""
    names, after = list(cases), after or {}
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            gc.collect()
            t0 = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - t0)
            if name in after:
                after[name]()
    return times


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: on a small machine shared with other jobs, more threads "
        "than free cores make every op wait for a descheduled thread, 10-15× slower and erratic)",
    )


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def median(values: list[float]) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def require(condition: bool, message: str) -> None:
    """An assertion that `python -O` keeps: a benchmark of the wrong thing must not print figures."""
    if not condition:
        raise AssertionError(message)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def table(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells (the first row the header): first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = (cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in pairs)
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def machine() -> str:
    import diffusers
    import peft
    import torch

    return (
        f"Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op thread(s)), "
        f"diffusers {diffusers.__version__}, peft {peft.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs"
    )
