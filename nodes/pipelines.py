"""Live pipelines for recipes: device and dtype policy, loading through the model manager, reconciling.

`materialize(ctx, recipe)` is the one way a node gets a real pipeline: the manager's resident
for (checkpoint, dtype, device), brought to the recipe by the reconciler, locked while in use.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import diffusers
import torch

from nodegraph.context import Context, NodeFailure
from nodes.checkpoints import CheckpointError, load_pipeline
from nodes.recipe import ModelRecipe
from nodes.reconcile import ReconcileError, Resident, reconcile

# Progress reaches the user as events; diffusers' own bars would be noise (transformers' are off
# through the environment, see nodes/__init__.py).
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
# PEFT warns on every second adapter loaded into a model; stacking adapters is the point here.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute in the model")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto`: half precision on GPUs (bf16 where supported), fp32 on CPUs."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@contextmanager
def materialize(ctx: Context, recipe: ModelRecipe) -> Iterator[Resident]:
    device = resolve_device(ctx.models.device)
    dtype = resolve_dtype(recipe.dtype, device)
    key = (*recipe.base, str(dtype), device)
    name = recipe.checkpoint.rsplit("/", 1)[-1]

    def load() -> Resident:
        started = time.perf_counter()
        try:
            pipe = load_pipeline(recipe.checkpoint, dtype).to(device)
        except CheckpointError as exc:
            raise NodeFailure(str(exc), "model", "bad_checkpoint") from exc
        pipe.set_progress_bar_config(disable=True)
        ctx.info(
            "load", f"loaded {name} ({str(dtype).removeprefix('torch.')}, {device})", time.perf_counter() - started
        )
        return Resident(pipe, recipe.bare(), device, scheduler_config=dict(pipe.scheduler.config))

    with ctx.models.use(key, load) as resident:
        started = time.perf_counter()
        try:
            actions = reconcile(resident, recipe)
        except ReconcileError as exc:
            if resident.broken:
                ctx.models.drop(key)
            raise NodeFailure(str(exc), "model", "lora_failed") from exc
        if actions:
            ctx.info("reconcile", "model: " + ", ".join(actions), time.perf_counter() - started)
        yield resident


@contextmanager
def watch_compile(ctx: Context, resident: Resident) -> Iterator[None]:
    """Tell the user when a compiled denoiser compiles or recompiles, and how long the call took."""
    if resident.compiled is None:
        yield
        return
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    started = time.perf_counter()
    yield
    graphs = counters["stats"]["unique_graphs"] - before
    if graphs:
        first = not resident.compile_seen
        what = "compiled the denoiser" if first else (
            "recompiled the denoiser (a new resolution or batch size; CompileModel's dynamic avoids this)")
        ctx.info("compile", f"{what}: {graphs} graph(s), the call took", time.perf_counter() - started)
    resident.compile_seen = True
