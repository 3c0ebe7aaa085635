"""Writing a live pipeline's weights (fused LoRAs included) as a checkpoint, atomically, never over another.

Two layouts: a diffusers folder (`save_pretrained`, then every tensor file rewritten in the chosen dtype)
or one safetensors file in the original ldm/SGM key layout that `LoadCheckpoint` reads, with the config
values no tensor shape records (`checkpoints.CONFIG_HINTS_KEY`), so it loads back offline to the same
configs. Names are numbered as SaveImage numbers PNGs (`nodegraph.naming`): `{name}_{counter:05}_.safetensors`
or a folder `{name}_{counter:05}_`. A folder is built under a temporary name and renamed into place; a file is
written to a temporary name and linked into place: a reader never sees half a checkpoint, and nothing is replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from nodegraph.naming import link_numbered, move_numbered
from nodes.engine.checkpoints import CONFIG_HINTS_KEY
from nodes.engine.single_file_configs import _HINTABLE

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_folder(pipe: Any, folder: Path, name: str, dtype: str) -> Path:
    """A diffusers folder `folder/{name}_{counter:05}_`; returns its path."""
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder))
    try:
        pipe.save_pretrained(temp, safe_serialization=True)
        for file in temp.rglob("*.safetensors"):
            from safetensors import safe_open

            with safe_open(str(file), "pt") as handle:
                metadata = handle.metadata()
            tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in load_file(file).items()}
            save_file(tensors, file, metadata=metadata)
        return move_numbered(temp, folder, name)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def save_single_file(pipe: Any, folder: Path, name: str, dtype: str) -> Path:
    """One ldm-layout file `folder/{name}_{counter:05}_.safetensors`; returns its path."""
    from safetensors.torch import save_file

    from nodes.engine.demo_models import to_ldm_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in to_ldm_state_dict(pipe).items()}
    hints = {component: _hints(getattr(pipe, component).config, keys)
             for component, keys in _HINTABLE.items() if getattr(pipe, component, None) is not None}
    handle, temp = tempfile.mkstemp(prefix=f".{name}-", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        save_file(state, temp, metadata={CONFIG_HINTS_KEY: json.dumps(hints, sort_keys=True)})
        return link_numbered(Path(temp), folder, name, ".safetensors")
    finally:
        os.unlink(temp)


def _hints(config: Any, keys: set[str]) -> dict[str, Any]:
    """The values of `keys` in a diffusers (mapping) or transformers (attributes) config, JSON-ready."""
    found = {key: config[key] if isinstance(config, dict) else getattr(config, key, None) for key in keys
             if (key in config if isinstance(config, dict) else hasattr(config, key))}
    return {key: list(value) if isinstance(value, tuple) else value for key, value in found.items()}
