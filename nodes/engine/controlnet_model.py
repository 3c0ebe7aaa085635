"""ControlNet files and residents: the CONTROL_NET value, reading configs offline, loading through the manager.

A CONTROL_NET value is a small frozen reference (`ControlNetRef`: path, fingerprint, config), never the
model: the weights load when a sampler needs them, through the model manager like pipelines, so a
ControlNet is loaded once, shared by every run that uses it and counted in the memory budgets.

Two layouts load, both safetensors only:
- a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`), with `from_pretrained`;
- one `.safetensors` file in diffusers' key layout (`controlnet_cond_embedding.…`, `controlnet_down_blocks.…`),
  as many SDXL ControlNets are shared. Its config is derived from the tensor shapes, plus the few values no
  shape records (head dimensions, SDXL's time-embedding width) from the file's config hints if it has them
  (the demo files do), else the family's convention. Nothing is downloaded.
The original ldm layout (`control_model.input_blocks.…`) is refused with a message saying so.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodegraph.context import Context, NodeFailure
from nodes.engine.checkpoints import CONFIG_HINTS_KEY, CheckpointError, read_header

CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
# Values no tensor shape records: a single file may carry them in its config hints ({"controlnet": {…}}).
HINTABLE = ("attention_head_dim", "addition_time_embed_dim", "norm_num_groups")
# What a ControlNet must share with the UNet it steers: its residuals are added to the UNet's skip connections.
MUST_MATCH = ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
              "transformer_layers_per_block", "addition_embed_type", "projection_class_embeddings_input_dim")


class ControlNetFileError(ValueError):
    """Not a loadable ControlNet; the message names the file and why."""


@dataclass(frozen=True)
class ControlNetRef:
    """CONTROL_NET: which ControlNet, not the model itself (that lives in the model manager)."""

    path: str
    fingerprint: str
    config_json: str  # the diffusers ControlNetModel config, canonical JSON

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = json.loads(self.config_json)
        return config

    @property
    def pooled(self) -> bool:
        """SDXL-style: conditioned on the pooled text embedding and the size numbers too."""
        return self.config.get("addition_embed_type") == "text_time"

    def describe(self) -> str:
        return f"{self.config['cross_attention_dim']}-dim text embeddings" + (
            " with pooled ones (SDXL-like)" if self.pooled else " without pooled ones (SD1.x/2.x-like)")

    def summary(self) -> str:
        return f"ControlNet {self.name} ({self.describe()})"


def read_config(path: Path) -> dict[str, Any]:
    """The ControlNetModel config of a folder or single file, from headers only."""
    try:
        if path.is_dir():
            config_file = path / CONFIG
            if not config_file.is_file() or not (path / WEIGHTS).is_file():
                raise ControlNetFileError(f"{path.name}: a ControlNet folder needs {CONFIG} and {WEIGHTS}")
            config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
            if not isinstance(config, dict) or config.get("_class_name") != "ControlNetModel":
                raise ControlNetFileError(f"{path.name}: {CONFIG} is not a ControlNetModel config")
            read_header(path / WEIGHTS)  # refuses a pickle or a damaged file early
            return config
        header = read_header(path)
    except CheckpointError as exc:
        raise ControlNetFileError(f"{path.name}: {exc.reason}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlNetFileError(f"{path.name}: {exc}") from None
    return derive_config(path, header.shapes, header.metadata)


def derive_config(path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> dict[str, Any]:
    """A diffusers-layout single file's config from its tensor shapes (and config hints)."""
    if "controlnet_cond_embedding.conv_in.weight" not in shapes:
        if any(k.startswith(("control_model.", "input_hint_block.")) for k in shapes):
            raise ControlNetFileError(f"{path.name}: a ControlNet in the original (ldm) layout; only diffusers-"
                                      "layout ControlNets load yet (a diffusers folder, or its weights as one file)")
        raise ControlNetFileError(f"{path.name}: not a ControlNet (no controlnet_cond_embedding weights)")

    def count(prefix: str) -> int:
        found = {m.group(1) for k in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        return len(found)

    levels = count("down_blocks.")
    channels = [shapes[f"down_blocks.{i}.resnets.0.conv2.weight"][0] for i in range(levels)]
    depths = [count(f"down_blocks.{i}.attentions.0.transformer_blocks.") for i in range(levels)]
    embedding = [shapes["controlnet_cond_embedding.conv_in.weight"][0]] + [
        shapes[f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"][0]
        for i in range(count("controlnet_cond_embedding.blocks.") // 2)]
    attn2 = sorted(k for k in shapes if k.endswith("attn2.to_k.weight"))
    proj_in = sorted(k for k in shapes if k.endswith(".proj_in.weight"))
    if not attn2 or not proj_in:
        raise ControlNetFileError(f"{path.name}: a ControlNet without cross-attention is not supported")
    sdxl = "add_embedding.linear_1.weight" in shapes
    config: dict[str, Any] = {
        "_class_name": "ControlNetModel",
        "in_channels": shapes["conv_in.weight"][1],
        "conditioning_channels": shapes["controlnet_cond_embedding.conv_in.weight"][1],
        "conditioning_embedding_out_channels": embedding,
        "block_out_channels": channels,
        "layers_per_block": count("down_blocks.0.resnets."),
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if count("mid_block.attentions.") else "UNetMidBlock2D",
        "cross_attention_dim": shapes[attn2[0]][1],
        "transformer_layers_per_block": [d or 1 for d in depths],
        "use_linear_projection": len(shapes[proj_in[0]]) == 2,
        # Conventions where no shape tells: SD 1.x has 8 heads, SDXL heads of 64 channels.
        "attention_head_dim": [max(1, c // 64) for c in channels] if sdxl else 8,
    }
    if sdxl:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=shapes["add_embedding.linear_1.weight"][1])
    try:
        hints = json.loads(metadata.get(CONFIG_HINTS_KEY, "{}")).get("controlnet", {})
    except (json.JSONDecodeError, AttributeError):
        hints = {}
    config.update({k: v for k, v in dict(hints).items() if k in HINTABLE})
    return config


def mismatch(ref: ControlNetRef, unet_config: Any) -> str | None:
    """Why a ControlNet cannot steer a UNet (its residuals would not fit), or None."""
    config = ref.config
    defaults = {"transformer_layers_per_block": 1, "addition_embed_type": None,
                "projection_class_embeddings_input_dim": None}
    for key in MUST_MATCH:
        mine, theirs = config.get(key, defaults.get(key)), unet_config.get(key, defaults.get(key))
        if key == "transformer_layers_per_block":
            levels = len(config["block_out_channels"])
            mine, theirs = (_per_level(v, levels) for v in (mine, theirs))
        elif isinstance(mine, (list, tuple)) and isinstance(theirs, (list, tuple)):
            mine, theirs = list(mine), list(theirs)
        if mine != theirs:
            return f"its {key} is {mine}, the model's is {theirs}"
    return None


def _per_level(value: Any, levels: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def load_controlnet(path: Path, config: dict[str, Any], dtype: Any) -> Any:
    """The ControlNetModel of a folder or single file, in `dtype`, on the CPU."""
    import torch
    from diffusers import ControlNetModel

    if path.is_dir():
        return ControlNetModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True,
                                               use_safetensors=True).eval()
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    with init_empty_weights():
        model = ControlNetModel.from_config(config)
    state = {k: v.to(dtype) for k, v in load_file(path).items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ControlNetFileError(f"{path.name}: the weights do not fit the derived config: "
                                  f"{str(exc).splitlines()[0][:300]}") from None
    return model.to(torch.device("cpu")).eval()


class ResidentControlNet:
    """A loaded ControlNet as the model manager sees it (the `Residency` protocol).

    Placed like pipelines: on the compute device when the budget has room, else offloaded with diffusers'
    group offloading: from the CPU onto a GPU layer by layer, or, on a CPU short of RAM, from files on
    disk a block at a time (`offload_dir`, removed on release).
    """

    def __init__(self, model: Any, device: str, offload: bool = False) -> None:
        import tempfile

        import torch

        self.model, self.device, self.offload_dir = model, device, None
        self.offloaded = offload
        if not offload:
            model.to(device)
        elif device != "cpu":
            model.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                       offload_type="leaf_level", use_stream=device.startswith("cuda"))
        else:
            self.offload_dir = tempfile.mkdtemp(prefix="nodegraph-offload-")
            model.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                       offload_type="block_level", num_blocks_per_group=1,
                                       offload_to_disk_path=self.offload_dir)

    def memory(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        if self.offload_dir is not None:
            return totals  # the weights are in files, a block at a time in memory while it runs
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            where = str(tensor.device)
            totals[where] = totals.get(where, 0) + tensor.numel() * tensor.element_size()
        return totals

    def move(self, device: str) -> None:
        if not self.offloaded:  # offloaded weights stay where the offloading keeps them
            self.model.to(device)
        self.device = device

    def release(self) -> None:
        import shutil

        self.model = None
        if self.offload_dir is not None:
            shutil.rmtree(self.offload_dir, ignore_errors=True)


def weights_bytes(ref: ControlNetRef, dtype: Any) -> int:
    import torch

    path = Path(ref.path)
    header = read_header(path / WEIGHTS if path.is_dir() else path)
    return sum(math.prod(s) for s in header.shapes.values()) * torch.empty((), dtype=dtype).element_size()


@contextmanager
def resident_controlnets(ctx: Context, refs: list[ControlNetRef], dtype: Any) -> Iterator[dict[ControlNetRef, Any]]:
    """Each ControlNet's live model on the compute device, from the model manager, locked while inside."""
    manager = ctx.models
    device = manager.device
    with ExitStack() as stack:
        models: dict[ControlNetRef, Any] = {}
        for ref in refs:
            def load(placement: Any, ref: ControlNetRef = ref) -> ResidentControlNet:
                try:
                    model = load_controlnet(Path(ref.path), ref.config, dtype)
                except ControlNetFileError as exc:
                    raise NodeFailure(str(exc), "positive", "bad_controlnet") from None
                except Exception as exc:  # diffusers raises many types; tie them to the file
                    raise NodeFailure(f"{ref.name}: diffusers could not load it: {exc}", "positive",
                                      "bad_controlnet") from None
                return ResidentControlNet(model, placement.device, placement.offload)

            key = ("controlnet", ref.path, ref.fingerprint, str(dtype), device)
            resident = stack.enter_context(manager.use(key, load, weights_bytes(ref, dtype), ref.name, ctx.info))
            models[ref] = resident.model
        yield models
