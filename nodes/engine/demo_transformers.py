"""The bundled demo transformer models: tiny Flux- and SD3-shaped pipelines and their LoRAs.

Real architectures (diffusers' FluxPipeline and StableDiffusion3Pipeline, with CLIP and T5 text encoders and a
flow-matching scheduler) at the tiny widths diffusers' own pipeline tests use, random weights from a seed.
`nodes.engine.demo_models` writes them beside the SD models:

    checkpoints/tiny-flux/                        diffusers folder, FluxPipeline (dev layout: guidance embedding)
    diffusion_models/tiny-flux.safetensors        its transformer alone, in the original (BFL) key layout
    text_encoders/tiny-flux-clip_l.safetensors, text_encoders/tiny-flux-t5.safetensors, vae/tiny-flux-ae.safetensors
                                                  its text encoders and VAE alone, as ComfyUI's loaders take them
    checkpoints/tiny-sd3/                         diffusers folder, StableDiffusion3Pipeline
    loras/tiny-flux-*.safetensors, tiny-sd3-*     LoRAs in diffusers' and Kohya's Flux layouts (DEMO_TRANSFORMER_LORAS)

Neither tokenizer needs files: CLIP's is the generated demo BPE (`clip_tokenizers.demo_clip_tokenizer`), T5's a
small unigram vocabulary over the same demo words (`demo_t5_tokenizer`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodes.engine.checkpoints import CONFIG_HINTS_KEY

#: Flux's flow-matching scheduler, dev flavour (resolution-dependent shift), as its model_index ships it.
FLUX_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                  "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
#: Flux schnell: a fixed schedule, no shift.
FLUX_SCHNELL_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
#: What no tensor of a Flux transformer file records (its rotary axes), written into the demo file.
FLUX_AXES = (4, 4, 8)
T5_WORDS = ("a an the of in on with and photo painting portrait landscape cat dog bird horse tree house city "
            "mountain river sea sky sunset night forest flower red blue green yellow black white golden style "
            "oil watercolor watercolour sketch detailed high quality blurry ugly fox snow").split()


@dataclass(frozen=True)
class TransformerLora:
    model: str  # "flux" or "sd3"
    rank: int
    alpha: float
    targets: tuple[str, ...]  # diffusers: last component(s) of module names; kohya: BFL layer names after the block
    kohya: bool = False


_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
DEMO_TRANSFORMER_LORAS: dict[str, TransformerLora] = {
    "tiny-flux-style": TransformerLora("flux", 4, 4, _ATTENTION),
    "tiny-flux-rank8": TransformerLora("flux", 8, 4, _ATTENTION),
    "tiny-flux-subset": TransformerLora("flux", 4, 4, ("to_q", "to_v")),
    "tiny-flux-kohya": TransformerLora("flux", 4, 2, ("img_attn.qkv", "img_attn.proj", "txt_attn.proj", "linear2"),
                                       kohya=True),
    "tiny-sd3-style": TransformerLora("sd3", 4, 4, _ATTENTION),
}
LORA_RELATIVE_STRENGTH = 1.5


def demo_t5_tokenizer() -> Any:
    """A working T5 tokenizer (unigram) over the demo words and single characters; no files needed."""
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", "▁", *(f"▁{w}" for w in T5_WORDS)]
    pieces += [c for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?-'" if c not in pieces]
    vocab = [(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _t5(seed: int, name: str, width: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    from nodes.engine.demo_models import _seeded

    tokenizer = demo_t5_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, is_encoder_decoder=False, use_cache=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=0)
    with _seeded(seed, name):
        return T5EncoderModel(config).eval()


def _vae(seed: int, name: str, shift: float, scale: float) -> Any:
    from diffusers import AutoencoderKL

    from nodes.engine.demo_models import _seeded

    with _seeded(seed, name):
        # Four levels and 16 latent channels, like the real VAEs: latents are 16 × 1/8 of the image.
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4,
                             block_out_channels=(16,) * 4,
                             norm_num_groups=16, latent_channels=16, sample_size=64, use_quant_conv=False,
                             use_post_quant_conv=False,
                             shift_factor=shift, scaling_factor=scale)


def build_flux_pipeline(seed: int = 0) -> Any:
    """The tiny Flux.1-dev-shaped pipeline: CLIP-L + T5, a guidance-embedding transformer, flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from nodes.engine.demo_models import _seeded, _tiny_clip

    with _seeded(seed, "flux/transformer"):
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, guidance_embeds=True,
                                             axes_dims_rope=list(FLUX_AXES))
    text_encoder, tokenizer = _tiny_clip(seed, "flux/text_encoder", "<|endoftext|>", activation="gelu")
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
                        vae=_vae(seed, "flux/vae", 0.1159, 0.3611), text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=_t5(seed, "flux/text_encoder_2", 32), tokenizer_2=demo_t5_tokenizer(),
                        transformer=transformer)


def build_sd3_pipeline(seed: int = 0) -> Any:
    """The tiny SD3-shaped pipeline: CLIP-L + CLIP-G + T5, an MMDiT transformer, flow matching with shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from nodes.engine.demo_models import _seeded, _tiny_clip

    with _seeded(seed, "sd3/transformer"):
        transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                            joint_attention_dim=96, pooled_projection_dim=96, out_channels=16,
                                            pos_embed_max_size=32)  # positions for up to 512×512 images
    text_encoder, tokenizer = _tiny_clip(seed, "sd3/text_encoder", "<|endoftext|>", projection=True)
    text_encoder_2, tokenizer_2 = _tiny_clip(seed, "sd3/text_encoder_2", "!", hidden=64, projection=True,
                                             activation="gelu")
    # Projection widths 32 and 64: the pooled embedding is their concatenation (96), as the T5 width is.
    text_encoder_2.config.projection_dim = 64
    text_encoder_2.text_projection = _resized_projection(text_encoder_2, seed)
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
                                    vae=_vae(seed, "sd3/vae", 0.0609, 1.5305), text_encoder=text_encoder,
                                    tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                    text_encoder_3=_t5(seed, "sd3/text_encoder_3", 96),
                                    tokenizer_3=demo_t5_tokenizer(), transformer=transformer)


def _resized_projection(model: Any, seed: int) -> Any:
    import torch

    from nodes.engine.demo_models import _seeded

    with _seeded(seed, "sd3/text_encoder_2/projection"):
        return torch.nn.Linear(model.config.hidden_size, model.config.projection_dim, bias=False)


# ---------------------------------------------------------------------------------------------- Flux files


def write_flux_transformer_file(pipe: Any, path: Path) -> Path:
    """The Flux transformer alone as one safetensors file in the original (BFL) layout, with its config hints."""
    from safetensors.torch import save_file

    from nodes.engine.transformer_checkpoints import flux_to_original

    state = {k: v.detach().contiguous().clone() for k, v in flux_to_original(pipe.transformer.state_dict()).items()}
    hints = {"transformer": {"axes_dims_rope": list(FLUX_AXES)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path, metadata={CONFIG_HINTS_KEY: json.dumps(hints, sort_keys=True)})
    return path


def write_flux_component_files(pipe: Any, folder: Path) -> list[Path]:
    """CLIP-L and T5 (transformers' key layout) and the VAE (ldm layout) as one file each, as Flux is shared."""
    from safetensors.torch import save_file

    from nodes.engine.demo_models import _with_text_model_level, vae_key_to_ldm

    clip, t5, vae = (folder / "text_encoders" / "tiny-flux-clip_l.safetensors",
                     folder / "text_encoders" / "tiny-flux-t5.safetensors", folder / "vae" / "tiny-flux-ae.safetensors")
    clip_hints = {"text_encoder": {"num_attention_heads": 4, "hidden_act": "gelu"}}
    config = pipe.vae.config
    vae_hints = {"vae": {"norm_num_groups": config.norm_num_groups, "scaling_factor": config.scaling_factor,
                         "shift_factor": config.shift_factor}}
    levels = len(config.block_out_channels)
    vae_state = {}
    for key, value in pipe.vae.state_dict().items():
        name = vae_key_to_ldm(key, levels)
        vae_state[name] = value[:, :, None, None] if ".mid.attn_1." in name and value.ndim == 2 else value
    t5_state = {k: v for k, v in pipe.text_encoder_2.state_dict().items() if k != "encoder.embed_tokens.weight"}
    for path, state, hints in ((clip, _with_text_model_level(pipe.text_encoder.state_dict()), clip_hints),
                               (t5, t5_state, None), (vae, vae_state, vae_hints)):
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().clone() for k, v in state.items() if not k.endswith("position_ids")}
        save_file(tensors, path, metadata={CONFIG_HINTS_KEY: json.dumps(hints, sort_keys=True)} if hints else None)
    return [clip, t5, vae]


# ---------------------------------------------------------------------------------------------- LoRAs


def make_transformer_lora(pipe: Any, name: str, seed: int) -> tuple[dict[str, Any], dict[str, str] | None]:
    """Random LoRA tensors for the demo LoRA `name` (non-zero B), and the metadata diffusers needs for alpha."""
    import torch

    from nodes.engine.demo_models import _derived_seed, _targets

    spec = DEMO_TRANSFORMER_LORAS[name]
    generator = torch.Generator().manual_seed(_derived_seed(seed, f"lora/{name}"))
    transformer = pipe.transformer
    spread = LORA_RELATIVE_STRENGTH * float(transformer.transformer_blocks[0].attn.to_q.weight.detach().std())
    tensors: dict[str, Any] = {}

    def pair(rows: int, columns: int) -> tuple[Any, Any]:
        down = torch.randn(spec.rank, columns, generator=generator) / columns**0.5
        up = torch.randn(rows, spec.rank, generator=generator) * spread * (columns / spec.rank) ** 0.5
        return down, up / (spec.alpha / spec.rank)

    if spec.kohya:
        shapes = flux_original_linear_shapes(transformer)
        for layer, (columns, rows) in sorted(shapes.items()):
            if not layer.endswith(spec.targets):
                continue
            key = "lora_unet_" + layer.replace(".", "_")
            down, up = pair(rows, columns)
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": torch.tensor(float(spec.alpha))})
        return tensors, None
    targets = _targets(transformer, spec.targets)
    for target in targets:
        layer = transformer.get_submodule(target)
        down, up = pair(layer.out_features, layer.in_features)
        tensors[f"transformer.{target}.lora_A.weight"] = down
        tensors[f"transformer.{target}.lora_B.weight"] = up
    metadata = {"transformer.r": spec.rank, "transformer.lora_alpha": spec.alpha, "transformer.target_modules": targets}
    return tensors, {"lora_adapter_metadata": json.dumps(metadata, indent=2, sort_keys=True)}


def flux_original_linear_shapes(transformer: Any) -> dict[str, tuple[int, int]]:
    """BFL layer name (no `.weight`) -> (in, out) of every linear layer of a diffusers Flux transformer."""
    from nodes.engine.transformer_checkpoints import flux_to_original

    state = flux_to_original({k: v for k, v in transformer.state_dict().items() if k.endswith(".weight")})
    return {k.removesuffix(".weight"): (v.shape[1], v.shape[0]) for k, v in state.items() if v.ndim == 2}


def write_demo_transformers(folder: Path, seed: int) -> None:
    """Write the transformer demo models and LoRAs under `folder` (a staging models folder)."""
    from safetensors.torch import save_file

    pipelines = {"flux": build_flux_pipeline(seed), "sd3": build_sd3_pipeline(seed)}
    for family, pipe in pipelines.items():
        pipe.save_pretrained(folder / "checkpoints" / f"tiny-{family}", safe_serialization=True)
    write_flux_transformer_file(pipelines["flux"], folder / "diffusion_models" / "tiny-flux.safetensors")
    write_flux_component_files(pipelines["flux"], folder)
    for name, spec in DEMO_TRANSFORMER_LORAS.items():
        tensors, metadata = make_transformer_lora(pipelines[spec.model], name, seed)
        save_file(tensors, folder / "loras" / f"{name}.safetensors", metadata=metadata)


def demo_transformer_paths(root: Path) -> list[Path]:
    return [root / "checkpoints" / "tiny-flux", root / "checkpoints" / "tiny-sd3",
            root / "diffusion_models" / "tiny-flux.safetensors",
            root / "text_encoders" / "tiny-flux-clip_l.safetensors",
            root / "text_encoders" / "tiny-flux-t5.safetensors",
            root / "vae" / "tiny-flux-ae.safetensors",
            *(root / "loras" / f"{name}.safetensors" for name in DEMO_TRANSFORMER_LORAS)]
