"""Live pipelines for recipes: device and dtype policy, loading through the model manager, reconciling.

`materialize(ctx, recipe)` is the one way a node gets a real pipeline: the manager's resident
for (checkpoint, dtype, device), brought to the recipe by the reconciler, locked while in use.
The manager decides where it lives; a model larger than its budget runs with diffusers' offloading.
With `--text-encoder-device`, the text encoders live there instead (float32 on a CPU where the model's
half type is slow) and take no part in offloading.
"""

from __future__ import annotations

import functools
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import diffusers
import torch

from nodegraph.context import Context, NodeFailure
from nodegraph.models import Placement, device_kind, format_bytes
from nodes.engine import lora_cache, lora_files
from nodes.engine.checkpoints import (
    TEXT_ENCODERS,
    CheckpointError,
    MissingTokenizerError,
    load_pipeline,
    read_header,
)
from nodes.engine.recipe import Adapter, ModelRecipe
from nodes.engine.reconcile import ReconcileError, reconcile
from nodes.engine.resident import Resident

# Progress reaches the user as events; diffusers' own bars would be noise (transformers' are off
# through the environment, see nodes/__init__.py).
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
# PEFT warns on every second adapter loaded into a model; stacking adapters is the point here.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute in the model")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
T = TypeVar("T")
SHORT = {dtype: name for name, dtype in DTYPES.items()}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto`: half precision on GPUs (bf16 where supported), bf16 on CPUs with bf16 matrix units, else fp32."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("mps"):
        return torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


@functools.cache
def cpu_has_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matrix products run natively (an SD1.5 UNet forward 2.4× faster than fp32).

    `NODEGRAPH_CPU_BF16=0` (or `1`) overrides what /proc/cpuinfo says: `auto` is then fp32 on every CPU, so
    results do not depend on the CPU model (the tests set it: their references are fp32)."""
    stated = os.environ.get("NODEGRAPH_CPU_BF16", "").strip()
    if stated in ("0", "1"):
        return stated == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return re.search(r"\b(amx_bf16|avx512_bf16)\b", flags) is not None


def text_encoder_dtype(dtype: torch.dtype, device: str | None) -> torch.dtype:
    """The text encoders' dtype on their own device: float32 on a CPU for fp16, and for bf16 without bf16 units."""
    slow = dtype == torch.float16 or (dtype == torch.bfloat16 and not cpu_has_bf16())
    return torch.float32 if device == "cpu" and slow else dtype


def estimate_bytes(checkpoint: str, dtype: torch.dtype, text_encoders: bool = True) -> int:
    """The size of a checkpoint's weights once loaded in `dtype`, from the safetensors headers alone (without
    a folder's text encoders when `text_encoders` is false)."""
    path = Path(checkpoint)
    # A folder may hold variants (unet/diffusion_pytorch_model.fp16.safetensors) diffusers does not load.
    files = [path] if path.is_file() else [f for f in path.rglob("*.safetensors") if f.name.count(".") == 1 and (
        text_encoders or f.relative_to(path).parts[0] not in TEXT_ENCODERS)]
    numel = sum(math.prod(shape) for f in files for shape in read_header(f).shapes.values())
    return numel * torch.empty((), dtype=dtype).element_size()


@contextmanager
def materialize(ctx: Context, recipe: ModelRecipe, *more: ModelRecipe) -> Iterator[Resident]:
    """The resident pipeline for `recipe`'s checkpoint, with `recipe` and each of `more` (other parts of the same
    checkpoint, such as a CLIP recipe) reconciled, locked while the caller uses it."""
    manager = ctx.models
    lora_cache.CACHE.attach(manager)  # its bytes count in this manager's budgets
    recipes = (recipe, *more)
    device, encoders = manager.device, manager.text_encoder_device
    dtype = resolve_dtype(recipe.dtype, device)
    encoders_dtype = text_encoder_dtype(dtype, encoders)
    encoders = None if encoders == device else encoders  # on the compute device: they move with the rest
    key = (*recipe.base, str(dtype), device)
    name = recipe.checkpoint.rsplit("/", 1)[-1]
    current = manager.get(key)
    if current is not None and current.offload_dir is not None and any(
            r.part in current.parts and current.parts[r.part].applied != r for r in recipes):
        manager.drop(key)  # weights offloaded to disk are not changed in place: rebuilt for the new recipe
        current = None
    read_lora_files(recipes, current)
    try:
        apart = encoders is not None and device_kind(encoders) != device_kind(device)
        size = estimate_bytes(recipe.checkpoint, dtype, text_encoders=not apart) if current is None else 0
    except CheckpointError as exc:
        raise NodeFailure(str(exc), "model", "bad_checkpoint") from exc

    def load(placement: Placement) -> Resident:
        try:
            pipe = load_pipeline(recipe.checkpoint, dtype, text_encoder_dtype=encoders_dtype)
        except MissingTokenizerError as exc:
            raise NodeFailure(str(exc), "clip" if recipe.part == "clip" else "model", "missing_tokenizer") from exc
        except CheckpointError as exc:
            raise NodeFailure(str(exc), "model", "bad_checkpoint") from exc
        pipe.set_progress_bar_config(disable=True)
        resident = Resident.fresh(pipe, recipe, device=device, scheduler_config=dict(pipe.scheduler.config),
                                  text_encoder_device=encoders)
        with text_encoders_apart(pipe, encoders):
            if not placement.offload:
                pipe.to(device)
            elif device_kind(device) == "gpu":
                resident.offload = offload_to_cpu(pipe, device, manager.limit("gpu"))
            else:
                resident.offload = "disk"  # applied once the recipe is: LoRAs cannot load into offloaded modules
        return resident

    with manager.use(key, load, size, f"{name} ({SHORT[dtype]})", ctx.info) as resident:
        started = time.perf_counter()
        for wanted in recipes:
            if wanted.part not in resident.parts:
                continue  # a VAE recipe: nothing of it changes with LoRAs
            try:
                actions = reconcile(resident, wanted)
            except ReconcileError as exc:
                if resident.broken:
                    manager.drop(key)
                bad = isinstance(exc.__cause__, lora_files.LoraFileError)  # e.g. read again after an eviction
                raise NodeFailure(str(exc), "model" if wanted.part == "unet" else "clip",
                                  "bad_lora" if bad else "lora_failed") from exc
            if actions:
                what = "model" if wanted.part == "unet" else "clip"
                ctx.info("reconcile", f"{what}: " + ", ".join(actions), time.perf_counter() - started)
        if resident.offload == "disk" and resident.offload_dir is None:
            offload_to_disk(resident)
        yield resident


def read_lora_files(recipes: tuple[ModelRecipe, ...], current: Resident | None) -> None:
    """Read (through the LoRA cache, which checks every tensor) each LoRA file the recipes add to what the resident
    pipeline has applied, before any pipeline is loaded or touched: a damaged file (NaN or Inf tensors) is a
    `bad_lora` error naming it, not a reconcile half done or a black image."""
    applied = {(op.path, op.fingerprint) for r in recipes if current is not None and r.part in current.parts
               for op in current.parts[r.part].applied.ops if isinstance(op, Adapter)}
    for recipe in recipes:
        for op in recipe.ops:
            if isinstance(op, Adapter) and (op.path, op.fingerprint) not in applied:
                try:
                    lora_cache.CACHE.check(op.path, op.fingerprint)
                except lora_files.LoraFileError as exc:
                    raise NodeFailure(str(exc), "model" if recipe.part == "unet" else "clip", "bad_lora") from None


@contextmanager
def text_encoders_apart(pipe: Any, device: str | None) -> Iterator[None]:
    """With `device`, the pipeline's text encoders are hidden from it inside (so `to` and offloading leave them
    alone) and put on `device` after."""
    if device is None:
        yield
        return
    hidden = {name: getattr(pipe, name, None) for name in TEXT_ENCODERS}
    hidden = {name: module for name, module in hidden.items() if module is not None}
    for name in hidden:
        object.__setattr__(pipe, name, None)  # not the config: diffusers' setattr would rewrite it
    try:
        yield
    finally:
        for name, module in hidden.items():
            object.__setattr__(pipe, name, module)
            module.to(device)


def offload_to_cpu(pipe: Any, device: str, limit: int) -> str:
    """Run a model larger than the GPU budget from the CPU with diffusers' own offloading.

    Whole components move to the GPU in turn when the largest fits the budget; else leaf-level
    group offloading (layer by layer, overlapped with compute on a CUDA stream).
    """
    sizes = [sum(t.numel() * t.element_size() for t in module.parameters())
             for module in pipe.components.values() if isinstance(module, torch.nn.Module)]
    if max(sizes) <= limit:
        pipe.enable_model_cpu_offload(device=device)
        return "model"
    pipe.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                              offload_type="leaf_level", use_stream=device.startswith("cuda"))
    return "group"


def offload_to_disk(resident: Resident) -> None:
    """A model larger than the RAM budget on a CPU: its weights go to files, one block is read at a time."""
    resident.offload_dir = tempfile.mkdtemp(prefix="nodegraph-offload-")
    resident.pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                       offload_type="block_level", num_blocks_per_group=1,
                                       offload_to_disk_path=resident.offload_dir)


def is_out_of_memory(exc: BaseException) -> bool:
    # CUDA raises torch.OutOfMemoryError; the CPU and MPS allocators raise a plain RuntimeError.
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and (
        "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower()))


def retry_out_of_memory(ctx: Context, work: Callable[[], T], what: str) -> T:
    """Run `work`; on out-of-memory free other models and cached outputs and retry once, then fail clearly."""
    try:
        return work()
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        first = exc
    ctx.info("out_of_memory", f"out of memory {what}; released other models and cached outputs, retrying")
    ctx.free_memory()
    try:
        return work()
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
    manager = ctx.models
    kind = device_kind(manager.device)
    budget = "--vram-budget" if kind == "gpu" else "--ram-budget"
    raise NodeFailure(
        f"out of memory on {manager.device} {what}, even after releasing every other model "
        f"({str(first).splitlines()[0][:200]}). Models may use {format_bytes(manager.limit(kind))} of the "
        f"{format_bytes(manager.budget(kind))} {budget} ({format_bytes(manager.used(kind))} resident now). "
        f"Try a smaller size or batch, fp16/bf16, or a lower {budget} so more is left for inference.",
        None, "out_of_memory") from None


@contextmanager
def watch_compile(ctx: Context, resident: Resident) -> Iterator[None]:
    """Tell the user when a compiled denoiser compiles or recompiles, and how long the call took."""
    if resident.compiled is None:
        yield
        return
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    started = time.perf_counter()
    if not resident.compile_seen:
        where = "a CPU: expect minutes (about one for the demo model on 2 cores)" if resident.device == "cpu" else (
            "a GPU: expect up to a minute or two")
        ctx.info("compiling", f"compiling the denoiser (torch.compile) on its first call, on {where}")
    yield
    graphs = counters["stats"]["unique_graphs"] - before
    if graphs:
        first = not resident.compile_seen
        what = "compiled the denoiser" if first else (
            "recompiled the denoiser (a new resolution or batch size; CompileModel's dynamic avoids this)")
        ctx.info("compile", f"{what}: {graphs} graph(s), the call took", time.perf_counter() - started)
    resident.compile_seen = True
