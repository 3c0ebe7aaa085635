"""Loading an SD 1.x single-file checkpoint straight into meta-built diffusers modules: the cold-start fast path.

    load_sd15_file(path, header, config_dir, dtype, encoders_dtype) -> a StableDiffusionPipeline, or None

diffusers' `from_single_file` converts the ldm state dict component by component (a check of the layout against
every family it knows, then string rewriting of every key), building and loading each model in turn. Here the
modules are built on the meta device from the derived config folder (single_file_configs.single_file_config_dir), each
module's own parameter names are mapped to the file's by name (ldm_keys: the mapping the single-file writer
uses), and every tensor is taken from the memory-mapped file, cast once when the file's dtype differs, and
assigned (`load_state_dict(assign=True)`): no copy of a tensor already in the load dtype. The read + cast, most
of a load, runs on a second thread while this one builds the modules, tokenizer and scheduler (bench/cold.py:
an SD1.5 fp16 file loads as fp32 in about the time of the read + cast alone).

The result equals `from_single_file`'s bit for bit (tests/nodes/test_single_file.py): the same tensors cast the
same way, the same configs, scheduler and tokenizer. Anything this path does not expect (a missing or
differently shaped tensor, another family) returns None, and the caller uses `from_single_file`, which handles
every variant it knows and words the errors.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodes.engine.ldm_keys import unet_key_to_ldm, vae_key_to_ldm

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

    from nodes.engine.checkpoints import SafetensorsHeader

UNET, VAE, TEXT_ENCODER = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."


def load_sd15_file(
    path: Path, header: SafetensorsHeader, config_dir: Path, dtype: torch.dtype, encoders_dtype: torch.dtype
) -> StableDiffusionPipeline | None:
    """The SD 1.x pipeline in `path`, or None when the file's tensors are not exactly what the configs expect."""
    # The read + cast (a torch op: it runs without the GIL) on a thread of its own while this one builds the
    # modules, the tokenizer and the scheduler (Python: ≈0.9 s of a 4 s SD1.5 load on a CPU): on two cores the
    # load then takes about as long as the cast alone.
    wanted = {key: encoders_dtype if key.startswith(TEXT_ENCODER) else dtype
              for key in header.shapes if key.startswith((UNET, VAE, TEXT_ENCODER))}
    stop = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="nodegraph-cast") as pool:
        reading = pool.submit(_read_and_cast, path, wanted, stop)
        try:
            pipe = _assemble(path, header, config_dir, reading)
        finally:
            stop.set()  # after a refusal (None) or an error, the rest is not read
    return pipe


def _assemble(path: Path, header: SafetensorsHeader, config_dir: Path,
              reading: Future[dict[str, torch.Tensor]]) -> StableDiffusionPipeline | None:
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with _empty_modules():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    names = {
        "unet": _unet_names(unet),
        "vae": {key: VAE + vae_key_to_ldm(key, len(vae.config["block_out_channels"]))
                for key in vae.state_dict()},
        "text_encoder": {key: TEXT_ENCODER + (key if key.startswith("text_model.") else "text_model." + key)
                         for key in text_encoder.state_dict()},
    }
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    if not all(_shapes_match(modules[part], mapping, header.shapes) for part, mapping in names.items()):
        return None
    tokenizer = CLIPTokenizer.from_pretrained(config_dir / "tokenizer")
    scheduler = getattr(diffusers, _scheduler_name(config_dir)).from_pretrained(config_dir, subfolder="scheduler")
    expected = {part: module.state_dict() for part, module in modules.items()}
    tensors = reading.result()
    for part, mapping in names.items():
        state = {key: tensors.pop(ldm).reshape(expected[part][key].shape) for key, ldm in mapping.items()}
        modules[part].load_state_dict(state, strict=True, assign=True)
        modules[part].eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, unet=unet, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.register_to_config(_name_or_path=str(path))
    return pipe


def _read_and_cast(path: Path, wanted: dict[str, torch.dtype], stop: threading.Event) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), "pt") as file:
        for key, dtype in wanted.items():
            if stop.is_set():
                break
            out[key] = _cast(file.get_tensor(key), dtype)
    return out


def _empty_modules() -> ExitStack:
    """Parameters on the meta device (buffers such as CLIP's position ids are real), without random init."""
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights

    stack = ExitStack()
    stack.enter_context(init_empty_weights(include_buffers=False))
    stack.enter_context(no_init_weights())
    return stack


def _unet_names(unet: Any) -> dict[str, str]:
    config = unet.config
    up_attention = ["CrossAttn" in kind for kind in config["up_block_types"]]
    try:
        return {key: UNET + unet_key_to_ldm(key, config["layers_per_block"], up_attention)
                for key in unet.state_dict()}
    except ValueError:  # a module the ldm layout has no name for (an SDXL-style addition, say)
        return {}


def _shapes_match(module: Any, mapping: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> bool:
    """Every tensor of `module` has its file counterpart, of the same number of elements in the same layout
    (ldm keeps the VAE's attention projections as 1×1 convolutions: [c, c, 1, 1] for diffusers' [c, c])."""
    if not mapping:
        return False
    for key, tensor in module.state_dict().items():
        stored = shapes.get(mapping[key])
        if stored is None:
            return False
        if tuple(stored) != tuple(tensor.shape) and tuple(d for d in stored if d != 1) != tuple(
                d for d in tensor.shape if d != 1):
            return False
    return True


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The file's tensor is a view of its memory-mapped pages: kept as it is in the load dtype, cast once otherwise
    # (as diffusers' loader casts: `Tensor.to(dtype)`, floating-point tensors only).
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


def _scheduler_name(config_dir: Path) -> str:
    import json

    return str(json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text())["_class_name"])
