"""The bundled demo models: tiny SD1.5- and SDXL-shaped checkpoints and LoRAs, generated from a seed.

The machines that build and test nodegraph have no model hub, so the project makes its own models: random
weights in the real architectures, small enough that a 4-step 64x64 image takes a fraction of a second on
a CPU. `make_demo_models(root)` writes them into a models folder:

    checkpoints/tiny-sd15/               diffusers folder, StableDiffusionPipeline (PNDM scheduler)
    checkpoints/tiny-sd15.safetensors    the same weights as one file in the ldm / A1111 key layout
    checkpoints/tiny-sdxl/               diffusers folder, StableDiffusionXLPipeline (Euler scheduler)
    checkpoints/tiny-flux/, tiny-sd3/    Flux and SD3 (nodes/engine/demo_transformers.py), with
    diffusion_models/tiny-flux.safetensors   Flux's transformer alone, and their LoRAs
    loras/<name>.safetensors             the LoRAs described by DEMO_LORAS
    embeddings/tiny-<family>-embedding.safetensors   two-vector textual inversions (A1111 / clip_l+clip_g)
    controlnet/tiny-sd15-controlnet/     a ControlNet for tiny-sd15 (diffusers folder), and the same weights
    controlnet/tiny-sd15-controlnet.safetensors, controlnet/tiny-sdxl-controlnet.safetensors  as one file each
    ipadapter/tiny-sd15-ipadapter.safetensors, clip_vision/tiny-clip-vision.safetensors  (engine/demo_ipadapter.py)

The same seed gives byte-identical files; a second call with the same seed only checks the manifest.

    python -m nodes.engine.demo_models models/     # writes ./models/checkpoints and ./models/loras

`nodegraph models demo` also writes the demo input image, `demo.png`, into the input folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodes.engine.checkpoints import CONFIG_HINTS_KEY
from nodes.engine.clip_tokenizers import demo_clip_tokenizer
from nodes.engine.demo_ipadapter import demo_ipadapter_paths, write_demo_ipadapter
from nodes.engine.demo_transformers import demo_transformer_paths, write_demo_transformers
from nodes.engine.ldm_keys import _with_text_model_level, unet_key_to_ldm, vae_key_to_ldm  # noqa: F401 (re-exported)
from nodes.engine.single_file_configs import scheduler_config

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# A tiny SD1.5 or SDXL pipeline. diffusers registers pipeline components at run time, so their attributes
# (unet, vae, text_encoder, ...) are invisible to a type checker anyway.
DemoPipeline = Any

#: Bump whenever anything generated changes; older folders are then regenerated.
DEMO_VERSION = 6
MANIFEST_NAME = ".nodegraph-demo.json"

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class LoraSpec:
    """One demo LoRA. `tensors_of` names another demo LoRA whose A/B matrices this one reuses."""

    model: str  # "sd15" or "sdxl"
    rank: int
    alpha: float
    unet_targets: tuple[str, ...]  # last component(s) of the targeted UNet module names
    text_targets: tuple[str, ...] = ()
    kohya: bool = False  # Kohya key layout (lora_unet_..., lora_down/lora_up/alpha) instead of PEFT's
    tensors_of: str | None = None


DEMO_LORAS: dict[str, LoraSpec] = {
    "tiny-sd15-style": LoraSpec("sd15", 4, 4, UNET_ATTENTION),
    "tiny-sd15-kohya": LoraSpec("sd15", 8, 4, UNET_ATTENTION, kohya=True),
    "tiny-sd15-subset": LoraSpec("sd15", 4, 4, ("to_q", "to_v")),
    "tiny-sd15-te": LoraSpec("sd15", 4, 4, UNET_ATTENTION, TEXT_ATTENTION),
    # The style LoRA's A/B with half its alpha: at strength 1.0 it equals the style LoRA at 0.5.
    "tiny-sd15-alpha": LoraSpec("sd15", 4, 2, UNET_ATTENTION, tensors_of="tiny-sd15-style"),
    "tiny-sd15-rank2": LoraSpec("sd15", 2, 2, UNET_ATTENTION),
    "tiny-sd15-rank8": LoraSpec("sd15", 8, 4, UNET_ATTENTION),
    "tiny-sdxl-style": LoraSpec("sdxl", 4, 4, UNET_ATTENTION),
}
# How far a strength-1.0 demo LoRA moves each targeted weight, relative to that weight's own spread:
# large enough to change an image visibly, small enough not to saturate it.
LORA_RELATIVE_STRENGTH = 1.5

# Values no tensor shape records; written into the single files so `nodes.engine.checkpoints` derives the
# exact configs the folders use (the tiny models are too small for the families' conventions).
_SD15_HINTS = {
    "unet": {"sample_size": 32},
    "vae": {"sample_size": 64},
    "text_encoder": {"num_attention_heads": 4},
}
_SDXL_HINTS = {
    "unet": {"sample_size": 32, "attention_head_dim": [2, 4]},
    "vae": {"sample_size": 64},
    "text_encoder": {"num_attention_heads": 4},
    "text_encoder_2": {"num_attention_heads": 4},
}


def make_demo_models(root: Path, seed: int = 0, input_dir: Path | None = None,
                     say: Callable[[str], None] = lambda message: None) -> list[Path]:
    """Write the demo checkpoints and LoRAs into `root` (once per seed and version), and the demo input
    image (`nodes.engine.demo_input`) into `input_dir` when one is given; return their paths. `say` hears what
    is being written as it starts (nothing when they are there already)."""
    from nodes.engine.demo_input import make_demo_input

    outputs = _write_demo_models(Path(root), seed, say)
    return outputs if input_dir is None else [*outputs, make_demo_input(Path(input_dir))]


def _write_demo_models(root: Path, seed: int, say: Callable[[str], None]) -> list[Path]:
    outputs = demo_model_paths(root)
    if _manifest_matches(root, seed, outputs):
        return outputs
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root):
        if _manifest_matches(root, seed, outputs):  # another process made them while we waited
            return outputs
        staging = Path(tempfile.mkdtemp(prefix=".demo-staging-", dir=root))
        try:
            _generate(staging, seed, say)
            # Move into place item by item; the manifest goes last, so an interrupted run starts over.
            (root / MANIFEST_NAME).unlink(missing_ok=True)
            for output in outputs:
                output.parent.mkdir(parents=True, exist_ok=True)
                if output.is_dir():
                    shutil.rmtree(output)
                os.replace(staging / output.relative_to(root), output)
            manifest = {"version": DEMO_VERSION, "seed": seed, "files": _file_sizes(root, outputs)}
            (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return outputs


def demo_model_paths(root: Path) -> list[Path]:
    """The checkpoints and LoRAs `make_demo_models(root)` writes."""
    checkpoints = Path(root) / "checkpoints"
    loras = [Path(root) / "loras" / f"{name}.safetensors" for name in DEMO_LORAS]
    return [
        checkpoints / "tiny-sd15",
        checkpoints / "tiny-sd15.safetensors",
        checkpoints / "tiny-sdxl",
        *loras,
        *demo_controlnet_paths(root),
        *demo_transformer_paths(Path(root)),
        *demo_embedding_paths(root),
        *demo_ipadapter_paths(Path(root)),
    ]


def demo_embedding_paths(root: Path) -> list[Path]:
    return [Path(root) / "embeddings" / f"tiny-{family}-embedding.safetensors" for family in ("sd15", "sdxl")]


def write_demo_embeddings(folder: Path, seed: int, pipelines: dict[str, DemoPipeline]) -> None:
    """Two-vector textual-inversion embeddings: A1111's layout for SD1.5, SDXL's clip_l + clip_g."""
    import torch
    from safetensors.torch import save_file

    (folder / "embeddings").mkdir(parents=True, exist_ok=True)
    for family, pipe in pipelines.items():
        generator = torch.Generator().manual_seed(_derived_seed(seed, f"embedding/{family}"))

        def vectors(encoder: Any, generator: torch.Generator = generator) -> torch.Tensor:
            table = encoder.get_input_embeddings().weight
            return (torch.randn(2, table.shape[1], generator=generator) * table.std() * 3).contiguous()

        tensors = {"emb_params": vectors(pipe.text_encoder)} if family == "sd15" else \
            {"clip_l": vectors(pipe.text_encoder), "clip_g": vectors(pipe.text_encoder_2)}
        save_file(tensors, folder / "embeddings" / f"tiny-{family}-embedding.safetensors")


def _file_sizes(root: Path, outputs: list[Path]) -> dict[str, int]:
    files = [f for out in outputs for f in (sorted(out.rglob("*")) if out.is_dir() else [out]) if f.is_file()]
    return {f.relative_to(root).as_posix(): f.stat().st_size for f in files}


def _manifest_matches(root: Path, seed: int, outputs: list[Path]) -> bool:
    """True when the manifest is for this version and seed and every file it lists is there, unchanged in size."""
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
        if manifest["version"] != DEMO_VERSION or manifest["seed"] != seed:
            return False
        files: dict[str, int] = manifest["files"]
        if not all(out.exists() for out in outputs):
            return False
        return all((root / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """Serialize generation into one folder across processes (parallel test workers, a CLI beside tests)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; generation is rare enough to go unguarded
        yield
        return
    with (root / ".nodegraph-demo.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _generate(folder: Path, seed: int, say: Callable[[str], None]) -> None:
    from safetensors.torch import save_file

    checkpoints, loras = folder / "checkpoints", folder / "loras"
    loras.mkdir(parents=True)
    say("1/5 tiny SD1.5 and SDXL checkpoints (folders, and SD1.5 as a single file)")
    pipelines: dict[str, DemoPipeline] = {"sd15": build_sd15_pipeline(seed), "sdxl": build_sdxl_pipeline(seed)}
    for family, pipe in pipelines.items():
        pipe.save_pretrained(checkpoints / f"tiny-{family}", safe_serialization=True)
    # SDXL's single file is left out to keep the folder small; write_single_file makes it on demand.
    write_single_file(pipelines["sd15"], checkpoints / "tiny-sd15.safetensors")
    say(f"2/5 {len(DEMO_LORAS)} LoRAs")
    for name, spec in DEMO_LORAS.items():
        tensors, metadata = make_lora(pipelines[spec.model], name, seed)
        save_file(tensors, loras / f"{name}.safetensors", metadata=metadata)
    say("3/5 ControlNets")
    write_demo_controlnets(folder, seed, pipelines)
    say("4/5 tiny SD3 and Flux (folders and ComfyUI's split files)")
    write_demo_transformers(folder, seed)
    say("5/5 embeddings, IP-Adapters and a CLIP vision encoder")
    write_demo_embeddings(folder, seed, pipelines)
    write_demo_ipadapter(folder, seed, {family: pipe.unet for family, pipe in pipelines.items()})


# ---------------------------------------------------------------------------------------------- models


def _derived_seed(seed: int, name: str) -> int:
    """An independent, stable seed per component, so that adding one never changes the others."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


@contextmanager
def _seeded(seed: int, name: str) -> Iterator[None]:
    """Seed torch's global RNG (module init draws from it) without disturbing the caller's stream."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_derived_seed(seed, name))
        yield


def _tiny_vae(seed: int, name: str, scaling_factor: float) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    with _seeded(seed, name):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            # Four levels, as in the real SD VAEs: a latent is 1/8 of the image, which ComfyUI's nodes assume.
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(32, 32, 32, 32),
            latent_channels=4,
            sample_size=64,
            scaling_factor=scaling_factor,
        )


def _tiny_clip(
    seed: int, name: str, pad_token: str, *, hidden: int = 32, projection: bool = False, activation: str = "quick_gelu"
) -> tuple[CLIPTextModel | CLIPTextModelWithProjection, CLIPTokenizer]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = demo_clip_tokenizer(pad_token)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=5,
        num_attention_heads=4,
        projection_dim=32,
        hidden_act=activation,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed, name):
        model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval(), tokenizer


def _scheduler(family: str) -> Any:  # a diffusers scheduler; their classes share no typed base
    import diffusers

    config = scheduler_config(family)
    return getattr(diffusers, config["_class_name"]).from_config(config)


def build_sd15_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The tiny SD1.5-shaped pipeline (≈2.1 M parameters), built in memory."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    with _seeded(seed, "sd15/unet"):
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,  # SD 1.x's convention: 8 heads
        )
    text_encoder, tokenizer = _tiny_clip(seed, "sd15/text_encoder", "<|endoftext|>")
    return StableDiffusionPipeline(
        vae=_tiny_vae(seed, "sd15/vae", 0.18215),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler("sd15"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """The tiny SDXL-shaped pipeline: two text encoders, size/crop conditioning (≈3.0 M parameters)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    with _seeded(seed, "sdxl/unet"):
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            cross_attention_dim=32 + 64,  # both text encoders' hidden states, concatenated
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 size/crop numbers + pooled text
        )
    text_encoder, tokenizer = _tiny_clip(seed, "sdxl/text_encoder", "<|endoftext|>")
    # The second encoder must be wider than the first, as in SDXL: diffusers' single-file loader tells the
    # two apart by width, and with equal widths it silently loads CLIP-L weights into text_encoder_2.
    text_encoder_2, tokenizer_2 = _tiny_clip(
        seed, "sdxl/text_encoder_2", "!", hidden=64, projection=True, activation="gelu"
    )
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(seed, "sdxl/vae", 0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler("sdxl"),
        add_watermarker=False,
    )


# ---------------------------------------------------------------------------------------------- ControlNets

# The spread of each ControlNet output convolution's weights, relative to 1/sqrt(fan_in). A trained
# ControlNet starts from zero convolutions (no effect); these are random, so that a hint visibly steers.
CONTROLNET_OUTPUT_GAIN = 0.5


def demo_controlnet_paths(root: Path) -> list[Path]:
    folder = Path(root) / "controlnet"
    return [folder / "tiny-sd15-controlnet", folder / "tiny-sd15-controlnet.safetensors",
            folder / "tiny-sdxl-controlnet.safetensors"]


def build_controlnet(unet: UNet2DConditionModel, seed: int, name: str) -> Any:
    """A ControlNet for `unet` (its encoder copied, as training starts), with random, non-zero output convolutions."""
    import torch
    from diffusers import ControlNetModel

    with _seeded(seed, f"controlnet/{name}"):
        # Four embedding levels: the hint is downsampled 8x, to the latent's size.
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 16, 32, 32))
        for conv in (net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks, net.controlnet_mid_block):
            fan_in = conv.weight[0].numel()
            torch.nn.init.normal_(conv.weight, std=CONTROLNET_OUTPUT_GAIN / fan_in**0.5)
            torch.nn.init.zeros_(conv.bias)
        # The hint's embedding is added to conv_in(latent): give what depends on the hint the same spread, so a
        # hint steers as much as the latent does (random embedding layers alone shrink it a hundredfold).
        with torch.no_grad():
            probe = torch.Generator().manual_seed(_derived_seed(seed, f"controlnet/{name}/probe"))
            embed = net.controlnet_cond_embedding
            for conv in (embed.conv_in, *embed.blocks, embed.conv_out):
                conv.bias.zero_()  # a black hint embeds to zero; the biases alone would dwarf the hint
            hint = embed(torch.rand(1, 3, 64, 64, generator=probe))
            latent = net.conv_in(torch.randn(1, unet.config.in_channels, 8, 8, generator=probe))
            embed.conv_out.weight.mul_(latent.std() / hint.std())
    return net.eval()


def write_demo_controlnets(folder: Path, seed: int, pipelines: dict[str, DemoPipeline]) -> None:
    """The demo ControlNets: SD1.5 as a diffusers folder and as one file, SDXL as one file."""
    from safetensors.torch import save_file

    from nodes.engine.controlnet_model import HINTABLE

    target = folder / "controlnet"
    for family, pipe in pipelines.items():
        net = build_controlnet(pipe.unet, seed, family)
        if family == "sd15":
            net.save_pretrained(target / f"tiny-{family}-controlnet", safe_serialization=True)
        # The values no shape records, so the file loads to exactly the folder's model (see nodes/controlnet_model.py).
        hints = {"controlnet": {k: net.config[k] for k in HINTABLE if k in net.config}}
        state = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
        save_file(state, target / f"tiny-{family}-controlnet.safetensors",
                  metadata={CONFIG_HINTS_KEY: json.dumps(hints, sort_keys=True)})


def _openclip_state_dict(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text model's state dict in OpenCLIP's names (fused q/k/v, transposed projection)."""
    import torch

    state = _with_text_model_level(state)
    out: dict[str, torch.Tensor] = {
        prefix + "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": state["text_model.final_layer_norm.bias"],
    }
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].T
    renames = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    for key, value in state.items():
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m and m[2] in renames:
            out[f"{prefix}transformer.resblocks.{m[1]}.{renames[m[2]]}.{m[3]}"] = value
        elif m and m[2] == "self_attn.q_proj":
            # OpenCLIP keeps q, k and v as one stacked projection.
            layer = f"text_model.encoder.layers.{m[1]}.self_attn."
            fused = torch.cat([state[f"{layer}{p}_proj.{m[3]}"] for p in "qkv"])
            out[f"{prefix}transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"] = fused
    return out


def write_single_file(pipe: DemoPipeline, path: Path) -> Path:
    """Save a demo pipeline as one safetensors file in the original layout, with its config hints."""
    from safetensors.torch import save_file

    hints = _SDXL_HINTS if getattr(pipe, "text_encoder_2", None) is not None else _SD15_HINTS
    # One metadata entry only (no "format": "pt"): safetensors writes its metadata from a hash map, so with
    # two entries their order, and the file's bytes, change from run to run.
    metadata = {CONFIG_HINTS_KEY: json.dumps(hints, sort_keys=True)}
    save_file(to_ldm_state_dict(pipe), path, metadata=metadata)
    return Path(path)


def to_ldm_state_dict(pipe: DemoPipeline) -> dict[str, torch.Tensor]:
    """A demo pipeline's weights in the original single-file layout (ldm for SD 1.x, SGM for SDXL)."""
    if getattr(pipe, "text_encoder_2", None) is None:
        text_encoders = {"cond_stage_model.transformer.": pipe.text_encoder}
    else:
        text_encoders = {
            "conditioner.embedders.0.transformer.": pipe.text_encoder,
            "conditioner.embedders.1.model.": pipe.text_encoder_2,
        }
    return components_to_ldm_state_dict(pipe.unet, pipe.vae, text_encoders)


def components_to_ldm_state_dict(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoders: dict[str, torch.nn.Module]
) -> dict[str, torch.Tensor]:
    """UNet, VAE and text encoders in the original layout. `text_encoders` maps each ldm prefix to its
    model; a prefix ending in `.model.` gets OpenCLIP's names, any other the transformers names."""
    unet_config, vae_config = unet.config, vae.config
    up_has_attention = ["CrossAttn" in t for t in unet_config["up_block_types"]]
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        out["model.diffusion_model." + unet_key_to_ldm(key, unet_config["layers_per_block"], up_has_attention)] = value
    levels = len(vae_config["block_out_channels"])
    for key, value in vae.state_dict().items():
        name = vae_key_to_ldm(key, levels)
        # ldm's VAE attention uses 1x1 convolutions where diffusers uses linear layers.
        if ".mid.attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out["first_stage_model." + name] = value
    for prefix, model in text_encoders.items():
        state = model.state_dict()
        if prefix.endswith(".model."):
            out.update(_openclip_state_dict(state, prefix))
        else:
            out.update({prefix + k: v for k, v in _with_text_model_level(state).items()})
    out = {k: v for k, v in out.items() if not k.endswith("position_ids")}
    # Each tensor gets its own storage: safetensors refuses views that share one.
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- LoRAs


def _targets(model: torch.nn.Module, suffixes: tuple[str, ...]) -> list[str]:
    import torch

    return sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name.endswith("." + s) for s in suffixes)
    )


def make_lora(pipe: DemoPipeline, name: str, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """Random tensors and safetensors metadata for the demo LoRA `name`, against `pipe`'s layer shapes.

    lora_B is not zero (a fresh PEFT adapter's is), so the LoRA changes the output. Each pair is scaled
    so that the weight change at strength 1.0 is LORA_RELATIVE_STRENGTH times the layer's own weight spread.
    """
    import torch

    spec = DEMO_LORAS[name]
    source = spec.tensors_of or name
    generator = torch.Generator().manual_seed(_derived_seed(seed, f"lora/{source}"))
    scale = DEMO_LORAS[source].alpha / spec.rank  # PEFT multiplies up @ down by alpha / rank
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, Any] = {}
    parts = [("unet", pipe.unet, spec.unet_targets), ("text_encoder", pipe.text_encoder, spec.text_targets)]
    for component, model, suffixes in parts:
        targets = _targets(model, suffixes) if suffixes else []
        for target in targets:
            layer = model.get_submodule(target)
            down = torch.randn(spec.rank, layer.in_features, generator=generator) / layer.in_features**0.5
            # Rows of `down` have unit norm, so (up @ down) has the spread of `up` times sqrt(rank / in).
            spread = (
                LORA_RELATIVE_STRENGTH * float(layer.weight.detach().std()) * (layer.in_features / spec.rank) ** 0.5
            )
            up = torch.randn(layer.out_features, spec.rank, generator=generator) * spread / scale
            if spec.kohya:
                kohya_name = ("lora_unet_" if component == "unet" else "lora_te_") + target.replace(".", "_")
                tensors[f"{kohya_name}.lora_down.weight"] = down
                tensors[f"{kohya_name}.lora_up.weight"] = up
                tensors[f"{kohya_name}.alpha"] = torch.tensor(float(spec.alpha))
            else:
                # The original-layout `text_model.` level is accepted by every transformers version.
                key = target
                if component == "text_encoder" and not target.startswith("text_model."):
                    key = "text_model." + target
                tensors[f"{component}.{key}.lora_A.weight"] = down
                tensors[f"{component}.{key}.lora_B.weight"] = up
        if targets and not spec.kohya:
            # Without this metadata diffusers silently loads the LoRA with alpha = rank.
            metadata.update(
                {
                    f"{component}.r": spec.rank,
                    f"{component}.lora_alpha": spec.alpha,
                    f"{component}.target_modules": targets,
                }
            )
    # A single metadata entry keeps the bytes reproducible (see write_single_file).
    if not metadata:
        return tensors, None
    return tensors, {"lora_adapter_metadata": json.dumps(metadata, indent=2, sort_keys=True)}


if __name__ == "__main__":
    for written in make_demo_models(Path(sys.argv[1] if len(sys.argv) > 1 else "models")):
        print(written)
