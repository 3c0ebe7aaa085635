"""NaN and Inf never end as a black image saved as a success: LoRA files and checkpoints are checked as they are
read, before any pipeline is touched, and the sampling core stops at the first step whose latent is non-finite."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nodegraph.context import NodeFailure
from nodegraph.executor import Executor
from nodegraph.models import ModelManager
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodes.engine import lora_cache
from nodes.engine.finite import first_non_finite
from nodes.engine.samplers import sample
from tests.nodes.test_diffusion import graph


def rewrite(source: Path, target: Path, change: dict[str, Any]) -> None:
    """`source` written to `target` (metadata kept) with `change[key](tensor)` applied to the tensors named."""
    with safe_open(str(source), "pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    for key, edit in change.items():
        tensors[key] = edit(tensors[key])
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata=metadata)


def nth_float_key(path: Path, prefix: str = "", n: int = 3) -> str:
    with safe_open(str(path), "pt") as handle:
        keys = [k for k in handle.keys() if k.startswith(prefix) and handle.get_slice(k).get_dtype() != "I64"]  # noqa: SIM118
    return sorted(keys)[n]


@pytest.fixture
def models(tmp_path: Path, demo_dir: Path) -> tuple[Settings, Path]:
    own = tmp_path / "models"
    own.mkdir()
    return Settings(models_dirs=(own, demo_dir), output_dir=tmp_path / "outputs"), own


def save_graph(wf: dict[str, Any]) -> dict[str, Any]:
    wf["nodes"]["save"] = {"type": "SaveImage", "inputs": {"images": ["sample", "images"], "filename_prefix": "x"}}
    return wf


def test_first_non_finite_names_the_first_bad_tensor() -> None:
    tensors = [("a", torch.ones(3)), ("ints", torch.arange(3)), ("b", torch.tensor([1.0, -math.inf])),
               ("c", torch.tensor([math.nan]))]
    assert first_non_finite(tensors) == "b"
    assert first_non_finite([("h", torch.tensor([math.nan], dtype=torch.float16))]) == "h"
    assert first_non_finite([("e", torch.empty(0)), ("f", torch.ones(2, dtype=torch.bfloat16))]) is None


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_lora_with_non_finite_tensors_is_bad_lora_before_any_pipeline(
        registry: Registry, models: tuple[Settings, Path], demo_dir: Path, value: float) -> None:
    settings, own = models
    source = demo_dir / "loras" / "tiny-sd15-style.safetensors"
    key = nth_float_key(source)
    rewrite(source, own / "loras" / "broken.safetensors", {key: lambda t: t.index_fill(0, torch.tensor([0]), value)})
    executor = Executor(registry, settings, models=ModelManager(device="cpu"))
    result = executor.run(save_graph(graph(loras=({"lora": "broken.safetensors", "strength": 1.0},))))
    assert result.status == "error"
    [error] = result.errors
    assert error.code == "bad_lora" and error.node_id == "sample"
    assert "broken.safetensors" in error.message and repr(key) in error.message
    assert executor.models.resident() == []  # found before the checkpoint was even loaded
    assert not list((settings.output_dir).rglob("*.png"))
    assert lora_cache.CACHE.count() == 0 or all(k[1] != str(own / "loras" / "broken.safetensors")
                                                for k in lora_cache.CACHE._entries)


def test_a_checkpoint_with_a_nan_tensor_is_bad_checkpoint(registry: Registry, models: tuple[Settings, Path],
                                                          demo_dir: Path) -> None:
    settings, own = models
    source = demo_dir / "checkpoints" / "tiny-sd15.safetensors"
    key = nth_float_key(source, "model.diffusion_model.")
    rewrite(source, own / "checkpoints" / "nan-sd15.safetensors", {key: lambda t: t * math.nan})
    executor = Executor(registry, settings, models=ModelManager(device="cpu"))
    result = executor.run(save_graph(graph(checkpoint="nan-sd15.safetensors")))
    assert result.status == "error"
    [error] = result.errors
    assert (error.node_id, error.code) == ("sample", "bad_checkpoint")
    assert "nan-sd15.safetensors" in error.message and "unet" in error.message and "NaN or Inf" in error.message
    assert executor.models.resident() == []
    assert not list((settings.output_dir).rglob("*.png"))


def test_a_latent_gone_non_finite_stops_sampling_at_that_step() -> None:
    calls = []

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        calls.append(float(sigma))
        return x * (math.inf if len(calls) == 3 else 0.5)

    sigmas = torch.linspace(10, 0, 6)
    with pytest.raises(NodeFailure) as caught:
        sample("euler", denoiser, torch.ones(1, 4, 8, 8), sigmas, seed=0)
    assert caught.value.code == "non_finite" and "after step 3 of 5" in str(caught.value)
    assert len(calls) == 3  # stopped there: no more model calls
    finite = sample("euler", lambda x, s: x * 0.5, torch.ones(1, 4, 8, 8), sigmas, seed=0)
    assert torch.isfinite(finite).all()


def test_a_diverging_model_is_a_non_finite_error_not_a_black_image(
        registry: Registry, models: tuple[Settings, Path], demo_dir: Path) -> None:
    settings, own = models
    source = demo_dir / "checkpoints" / "tiny-sd15.safetensors"
    # Finite weights whose products overflow float32: the UNet's output, and so the latent, turns to Inf/NaN.
    out = "model.diffusion_model.out.2.weight"
    rewrite(source, own / "checkpoints" / "huge-sd15.safetensors", {out: lambda t: t.sign() * 3e38})
    executor = Executor(registry, settings, models=ModelManager(device="cpu"))
    result = executor.run(save_graph(graph(checkpoint="huge-sd15.safetensors", steps=3)))
    assert result.status == "error"
    [error] = result.errors
    assert (error.node_id, error.input, error.code) == ("sample", None, "non_finite")
    assert "after step 1 of 3" in error.message
    assert not list((settings.output_dir).rglob("*.png"))


def test_on_a_gpu_a_steps_check_is_read_one_step_late_and_still_names_it() -> None:
    """With `lag` (a GPU: no host sync per step), step i's flag is read when step i + 1 is done, or at the end."""
    from nodes.engine.finite import FiniteWatch

    good, bad = torch.zeros(2), torch.tensor([0.0, math.nan])
    watch = FiniteWatch("euler", 4, lag=True)
    watch.after(0, good)
    watch.after(1, bad)  # not read yet
    with pytest.raises(NodeFailure, match="after step 2 of 4") as caught:
        watch.after(2, bad)
    assert caught.value.code == "non_finite"
    last = FiniteWatch("euler", 2, lag=True)
    last.after(0, good)
    last.after(1, bad)
    with pytest.raises(NodeFailure, match="after step 2 of 2"):
        last.done()
