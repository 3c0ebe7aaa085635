"""Text encoders and VAEs shared as separate files (ComfyUI's `text_encoders/` and `vae/`), as diffusers folders.

    flux_text_encoders_folder(clip_file, t5_file)  -> a folder holding a FluxPipeline of these two encoders only
    vae_folder(vae_file)                            -> a folder holding a pipeline of this VAE only

Flux is usually run from four files: the transformer (UNETLoader), CLIP-L and T5 (DualCLIPLoader) and the
autoencoder (VAELoader). Rather than a second loading path, each loader builds, once per file version, a small
diffusers folder in the cache dir that the rest of the runtime loads like any checkpoint (resident, reconciled,
counted in the budgets): configs derived from the headers, tokenizers, and the weights linked (text encoders,
already in transformers' key layout) or converted once (the VAE, in the original ldm layout).
What no shape records comes from the families' conventions or the file's `CONFIG_HINTS_KEY` metadata: the
CLIP's activation and heads, the VAE's group-norm width and its latent scale and shift (16 channels: Flux's).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodes.engine.checkpoints import (
    CONFIG_HINTS_KEY,
    CorruptCheckpointError,
    MissingTokenizerError,
    NotADiffusionCheckpointError,
    build_once,
    read_header,
)
from nodes.engine.clip_tokenizers import hf_cache_snapshots, tokenizer_for
from nodes.engine.single_file_configs import _clip_config, _indices, _shape, default_cache_dir

_VERSION = "1"
T5_VOCAB_SIZE = 32128
#: Latent scale and shift of the 16-channel VAEs (Flux's; SD3's differ, give them as hints).
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
_VAE_PREFIXES = ("first_stage_model.", "vae.")


def _hints(path: Path, metadata: dict[str, str], component: str) -> dict[str, Any]:
    raw = metadata.get(CONFIG_HINTS_KEY)
    if not raw:
        return {}
    try:
        value = json.loads(raw).get(component, {})
    except (json.JSONDecodeError, AttributeError):
        raise CorruptCheckpointError(path, f"metadata '{CONFIG_HINTS_KEY}' is not a JSON object") from None
    return dict(value) if isinstance(value, dict) else {}


def text_encoder_kind(path: Path) -> str:
    """"clip" or "t5", from the header; anything else is refused naming the file."""
    shapes = read_header(path).shapes
    if "text_model.embeddings.token_embedding.weight" in shapes:
        return "clip"
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in shapes:
        return "t5"
    raise NotADiffusionCheckpointError(path, "not a text encoder in transformers' key layout (CLIP or T5)")


def _build(name: str, sources: list[Path], write: Callable[[Path], None]) -> Path:
    """The cached folder for these source files (rebuilt when any changes), built beside it and renamed."""
    root = default_cache_dir().parent / "component-folders"
    stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources)
    return build_once(root / f"{name}-{hashlib.sha256(f'{_VERSION}:{stamp}'.encode()).hexdigest()[:24]}", write)


def _index(class_name: str, **components: list[str | None]) -> dict[str, Any]:
    import diffusers

    empty = dict.fromkeys(("feature_extractor", "image_encoder", "transformer", "vae", "text_encoder", "tokenizer",
                           "text_encoder_2", "tokenizer_2"), [None, None])
    return {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **empty,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], **components}


def _write_scheduler(folder: Path) -> None:
    from nodes.engine.demo_transformers import FLUX_SCHEDULER

    (folder / "scheduler").mkdir()
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", **FLUX_SCHEDULER}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(source.resolve(), target)
    except OSError:  # no symlinks here (some Windows setups): a copy
        shutil.copyfile(source, target)


def flux_text_encoders_folder(clip_file: Path, t5_file: Path) -> Path:
    """A folder with a FluxPipeline of CLIP-L (`text_encoder`) and T5 (`text_encoder_2`) only."""

    def write(folder: Path) -> None:
        clip_header, t5_header = read_header(clip_file), read_header(t5_file)
        config = _clip_config(clip_file, clip_header.shapes, "", "hf", "flux")
        config.update(_hints(clip_file, clip_header.metadata, "text_encoder"))
        tokenizer = tokenizer_for(clip_file, config["vocab_size"], "<|endoftext|>")
        config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
        t5_config = _t5_config(t5_file, t5_header.shapes)
        t5_tokenizer = _t5_tokenizer(t5_file, t5_config["vocab_size"])
        for name, cfg, source in (("text_encoder", config, clip_file), ("text_encoder_2", t5_config, t5_file)):
            _link(source, folder / name / "model.safetensors")
            (folder / name / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        tokenizer.save_pretrained(folder / "tokenizer")
        t5_tokenizer.save_pretrained(folder / "tokenizer_2")
        _write_scheduler(folder)
        index = _index("FluxPipeline", text_encoder=["transformers", "CLIPTextModel"],
                       tokenizer=["transformers", "CLIPTokenizer"], text_encoder_2=["transformers", "T5EncoderModel"],
                       tokenizer_2=["transformers", type(t5_tokenizer).__name__])
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))

    return _build("flux-text-encoders", [clip_file, t5_file], write)


def _t5_config(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    block = "encoder.block.0.layer."
    vocab, width = _shape(path, shapes, "shared.weight" if "shared.weight" in shapes else "encoder.embed_tokens.weight")
    buckets, heads = _shape(path, shapes, block + "0.SelfAttention.relative_attention_bias.weight")
    inner = _shape(path, shapes, block + "0.SelfAttention.q.weight")[0]
    gated = block + "1.DenseReluDense.wi_0.weight" in shapes
    d_ff = _shape(path, shapes, block + ("1.DenseReluDense.wi_0.weight" if gated else "1.DenseReluDense.wi.weight"))[0]
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": vocab, "d_model": width,
            "d_kv": inner // heads, "num_heads": heads, "d_ff": d_ff,
            "num_layers": len(_indices(shapes, "encoder.block.")), "relative_attention_num_buckets": buckets,
            "feed_forward_proj": "gated-gelu" if gated else "relu", "is_encoder_decoder": False, "use_cache": False,
            "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}


def _t5_tokenizer_folders() -> list[Path]:
    folders = [Path(p) for p in [os.environ.get("NODEGRAPH_T5_TOKENIZER", "")] if p]
    folders += hf_cache_snapshots("google/t5-v1_1-xxl")
    return [f for f in folders if (f / "tokenizer.json").is_file() or (f / "spiece.model").is_file()]


def t5_tokenizer_found(vocab_size: int) -> bool:
    """Whether `_t5_tokenizer` has a tokenizer for a T5 of this vocabulary, without building it."""
    return vocab_size == _demo_t5_size() or bool(_t5_tokenizer_folders())


@functools.cache
def _demo_t5_size() -> int:
    from nodes.engine.demo_transformers import demo_t5_tokenizer

    return len(demo_t5_tokenizer())


def _t5_tokenizer(path: Path, vocab_size: int) -> Any:
    """The demo T5 tokenizer for the demo's vocabulary; the real one from `$NODEGRAPH_T5_TOKENIZER` (a folder with
    tokenizer.json or spiece.model) or a local google/t5-v1_1-xxl snapshot."""
    from transformers import AutoTokenizer

    from nodes.engine.demo_transformers import demo_t5_tokenizer

    demo = demo_t5_tokenizer()
    if vocab_size == len(demo):
        return demo
    for folder in _t5_tokenizer_folders():
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    raise MissingTokenizerError(path, f"a T5 with a {vocab_size}-token vocabulary needs T5's tokenizer, not found "
                                      "offline: set NODEGRAPH_T5_TOKENIZER to a folder with its tokenizer.json "
                                      "or spiece.model, or place google/t5-v1_1-xxl's in the HF cache")


def vae_folder(vae_file: Path) -> tuple[Path, str]:
    """A folder with a pipeline of this (ldm-layout) VAE only, and the family it decodes for."""
    header = read_header(vae_file)
    prefix = next((p for p in _VAE_PREFIXES if any(k.startswith(p) for k in header.shapes)), "")
    shapes = {k.removeprefix(prefix): v for k, v in header.shapes.items()}
    levels = _indices(shapes, "encoder.down.")
    if not levels or "decoder.conv_in.weight" not in shapes:
        raise NotADiffusionCheckpointError(vae_file, "not a VAE in the original (ldm) key layout")
    channels = _shape(vae_file, shapes, "decoder.conv_in.weight")[1]
    family = "flux" if channels == 16 else "sd15"

    def write(folder: Path) -> None:
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
        from safetensors.torch import load_file, save_file

        config: dict[str, Any] = {
            "_class_name": "AutoencoderKL", "in_channels": _shape(vae_file, shapes, "encoder.conv_in.weight")[1],
            "out_channels": _shape(vae_file, shapes, "decoder.conv_out.weight")[0], "latent_channels": channels,
            "block_out_channels": [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels],
            "layers_per_block": len(_indices(shapes, "encoder.down.0.block.")),
            "down_block_types": ["DownEncoderBlock2D"] * len(levels),
            "up_block_types": ["UpDecoderBlock2D"] * len(levels),
            "use_quant_conv": "quant_conv.weight" in shapes, "use_post_quant_conv": "post_quant_conv.weight" in shapes,
            **(FLUX_VAE if family == "flux" else {"scaling_factor": 0.18215}),
        }
        config.update(_hints(vae_file, header.metadata, "vae"))
        state = convert_ldm_vae_checkpoint(load_file(str(vae_file)), config)
        (folder / "vae").mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "vae" / "diffusion_pytorch_model.safetensors")
        (folder / "vae" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        _write_scheduler(folder)
        index = _index("FluxPipeline", vae=["diffusers", "AutoencoderKL"])
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))

    return _build("vae", [vae_file], write), family
