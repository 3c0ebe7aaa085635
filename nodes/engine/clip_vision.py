"""CLIP vision encoders (CLIP_VISION): reading the files users have, loading them through the model manager,
encoding images for IP-Adapters.

A CLIP_VISION value is a small frozen reference (`VisionRef`: path, fingerprint, key prefix, config), read from
the file's header alone; the weights load when IPAdapterApply encodes an image, through the model manager (on
the text encoders' device, in the MODEL's dtype there), so an encoder loads once, is counted in the memory
budgets and can be evicted like any other model.

Files: one `.safetensors` holding transformers' CLIPVisionModelWithProjection weights (`vision_model.…` and
`visual_projection.weight`), as ComfyUI's `models/clip_vision/` files are, also under a prefix
(`clip_vision.vision_model.…`; keys outside the prefix, such as a whole CLIP model's `text_model.…`, are
ignored), or in OpenCLIP's own layout (`visual.conv1.weight`, `visual.transformer.resblocks.N.attn.in_proj_…`,
`visual.proj`: renamed, the fused attention projection split in three, `proj` transposed). The config comes
from, in order: the metadata (`clip_vision_config`, JSON), a transformers `config.json` beside the file, or
the tensor shapes (`derive_config`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nodegraph.context import Context, NodeFailure

CONFIG_KEY = "clip_vision_config"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the OpenAI CLIP normalization CLIPImageProcessor uses
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH = "vision_model.embeddings.patch_embedding.weight"  # the key whose position tells the prefix
OPENCLIP = "transformer.resblocks.0.attn.in_proj_weight"  # OpenCLIP's layout (with `conv1.weight` beside it)
# Attention heads are the one size no tensor shape records: the released CLIP vision encoders' widths
# (ViT-B 768, ViT-L 1024, ViT-H 1280, ViT-bigG 1664) and their head counts; other widths get 64-wide heads.
HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}


class ClipVisionError(ValueError):
    """Not a usable CLIP vision encoder; the message names the file and why."""


@dataclass(frozen=True)
class VisionRef:
    """CLIP_VISION: which encoder, not the model itself (that lives in the model manager)."""

    path: str
    fingerprint: str
    prefix: str  # what precedes the vision tower's keys in the file (`vision_model.…`, or OpenCLIP's `conv1.…`)
    config_json: str  # the CLIPVisionConfig, canonical JSON
    layout: str = "transformers"  # or "openclip": OpenCLIP's own key names (`key_names`)

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = json.loads(self.config_json)
        return config

    def summary(self) -> str:
        c = self.config
        return (f"CLIP vision {self.name} ({c['num_hidden_layers']} layers × {c['hidden_size']}, "
                f"{c['image_size']}px, {c['projection_dim']}-wide embeddings)")


def read_vision_file(path: Path, fingerprint: str) -> VisionRef:
    """The file's VisionRef from its header (no tensor is read); refuses layouts that cannot load."""
    from nodes.engine.checkpoints import CheckpointError, read_header

    try:
        header = read_header(path)
        config = _stated_config(path, header.metadata)
    except CheckpointError as exc:
        raise ClipVisionError(f"{path.name}: {exc.reason}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ClipVisionError(f"{path.name}: {exc}") from None
    prefix, layout = _layout(path.name, header.shapes)
    layers = len({m.group(1) for k in header.shapes
                  if (m := re.match(re.escape(prefix) + r"(?:vision_model\.encoder\.layers|transformer\.resblocks)\."
                                    r"(\d+)\.", k))})
    names = key_names(prefix, layout, layers, header.shapes)
    shapes = {ours: _shape(header.shapes[theirs], how) for ours, (theirs, how) in names.items()
              if theirs in header.shapes}
    config = derive_config(path.name, shapes) if config is None else config
    expected = expected_shapes(path.name, config)
    for key, shape in expected.items():
        if shapes.get(key) != shape:
            got = "missing" if key not in shapes else "×".join(map(str, shapes[key]))
            raise ClipVisionError(f"{path.name}: {names.get(key, (prefix + key,))[0]} is {got}; its config needs "
                                  f"{'×'.join(map(str, shape))} (not a CLIPVisionModelWithProjection's weights?)")
    return VisionRef(str(path), fingerprint, prefix, json.dumps(config, sort_keys=True), layout)


def _layout(name: str, shapes: dict[str, tuple[int, ...]]) -> tuple[str, str]:
    """The key prefix and the layout ("transformers" or "openclip") of a file's vision tower."""
    for key in shapes:
        if key.endswith(PATCH):
            return key.removesuffix(PATCH), "transformers"
        if key.endswith(OPENCLIP) and key.removesuffix(OPENCLIP) + "conv1.weight" in shapes:
            return key.removesuffix(OPENCLIP), "openclip"
    raise ClipVisionError(f"{name}: not a CLIP vision model (no {PATCH}, nor OpenCLIP's visual.conv1.weight)")


def key_names(prefix: str, layout: str, layers: int, shapes: Any) -> dict[str, tuple[str, str]]:
    """transformers' key -> (the file's key, how to take its tensor: "" as it is, "T" transposed, "0"/"1"/"2"
    the first/second/third of a fused query-key-value tensor)."""
    if layout == "transformers":
        return {k.removeprefix(prefix): (k, "") for k in shapes if k.startswith(prefix)}
    v, e = "vision_model.", "vision_model.embeddings."
    names = {e + "class_embedding": ("class_embedding", ""), PATCH: ("conv1.weight", ""),
             e + "position_embedding.weight": ("positional_embedding", ""), "visual_projection.weight": ("proj", "T")}
    renames = [(f"{v}pre_layrnorm", "ln_pre"), (f"{v}post_layernorm", "ln_post")]
    for i in range(layers):
        ours, theirs = f"{v}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        renames += [(ours + a, theirs + b) for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                    ("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))]
        for part in ("weight", "bias"):
            names.update({f"{ours}self_attn.{q}_proj.{part}": (f"{theirs}attn.in_proj_{part}", str(n))
                          for n, q in enumerate("qkv")})
    names.update({f"{a}.{part}": (f"{b}.{part}", "") for a, b in renames for part in ("weight", "bias")})
    return {ours: (prefix + theirs, how) for ours, (theirs, how) in names.items()}


def _shape(shape: tuple[int, ...], how: str) -> tuple[int, ...]:
    if how == "T":
        return shape[::-1]
    return (shape[0] // 3, *shape[1:]) if how else shape


def _tensor(tensor: torch.Tensor, how: str) -> torch.Tensor:
    if how == "T":
        return tensor.T.contiguous()
    return tensor.chunk(3)[int(how)] if how else tensor


def _stated_config(path: Path, metadata: dict[str, str]) -> dict[str, Any] | None:
    """The config the file states: its metadata's, or a transformers config.json beside it; None if neither."""
    text = metadata.get(CONFIG_KEY)
    beside = path.parent / "config.json"  # a transformers folder's model.safetensors
    if text is None and beside.is_file():
        text = beside.read_text(encoding="utf-8")
    if text is None:
        return None
    stated = json.loads(text)
    config = {k: v for k, v in stated.items() if k != "vision_config"}  # a CLIPModel config: its vision part
    config.update(stated.get("vision_config") or {})
    from transformers import CLIPVisionConfig

    known = CLIPVisionConfig().to_dict()
    return {k: v for k, v in config.items() if k in known and not k.startswith("_")}


def derive_config(name: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """CLIPVisionConfig values from the (prefix-free) tensor shapes of transformers' layout.

    The activation follows the layout as ComfyUI decides it: more than 24 layers is OpenCLIP's ViT-H/bigG
    (gelu), else OpenAI's ViT-L/14 and smaller (quick_gelu, also transformers' default).
    """
    try:
        hidden, channels, patch, _ = shapes[PATCH]
        positions = shapes["vision_model.embeddings.position_embedding.weight"][0]
        projection = shapes["visual_projection.weight"][0]
        intermediate = shapes["vision_model.encoder.layers.0.mlp.fc1.weight"][0]
    except (KeyError, ValueError) as exc:
        raise ClipVisionError(f"{name}: not a CLIPVisionModelWithProjection's weights (no {exc} of the "
                              "expected shape) and no config to say what it is") from None
    side = math.isqrt(positions - 1)
    layers = len({m.group(1) for k in shapes if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))})
    heads = HEADS.get(hidden, hidden // 64 if hidden % 64 == 0 else 0)
    if side * side != positions - 1 or not heads:
        raise ClipVisionError(f"{name}: an unknown CLIP vision layout ({positions} positions, {hidden} wide); "
                              f"put its config as JSON in the metadata ({CONFIG_KEY}) or a config.json beside it")
    return {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_channels": channels, "image_size": side * patch, "patch_size": patch,
            "projection_dim": projection, "hidden_act": "gelu" if layers > 24 else "quick_gelu"}


def _empty_model(config: dict[str, Any]) -> Any:
    """CLIPVisionModelWithProjection with its parameters on the meta device (its buffers are real)."""
    from accelerate import init_empty_weights
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with init_empty_weights():
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**config))


def expected_shapes(name: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    try:
        model = _empty_model(config)
    except Exception as exc:  # transformers' config validation raises its own types: tie them to the file
        raise ClipVisionError(f"{name}: its config does not make a CLIP vision model: "
                              f"{str(exc).splitlines()[0][:200]}") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_model(ref: VisionRef, dtype: torch.dtype, device: str) -> Any:
    """The encoder in `dtype` on `device`, eval mode: built on the meta device, the file's tensors assigned."""
    from safetensors import safe_open

    model = _empty_model(ref.config)
    with safe_open(ref.path, framework="pt", device="cpu") as f:
        names = key_names(ref.prefix, ref.layout, ref.config["num_hidden_layers"], f.keys())
        state = {key: _tensor(f.get_tensor(names[key][0]), names[key][1]).to(device, dtype)
                 for key in model.state_dict()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


class ResidentClipVision:
    """A loaded CLIP vision encoder as the model manager sees it (the `Residency` protocol)."""

    def __init__(self, model: Any, device: str) -> None:
        self.model, self.device = model, device

    def memory(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            where = str(tensor.device)
            totals[where] = totals.get(where, 0) + tensor.numel() * tensor.element_size()
        return totals

    def move(self, device: str) -> None:
        self.model.to(device)
        self.device = device

    def release(self) -> None:
        self.model = None


@contextmanager
def resident_clip_vision(ctx: Context, ref: VisionRef, dtype_name: str) -> Iterator[ResidentClipVision]:
    """The encoder from the model manager, locked while inside: on the text encoders' device (default: the
    compute device) in the MODEL's dtype as the text encoders get it there. When it does not fit the budget,
    it stays on the CPU."""
    from nodes.engine.checkpoints import read_header
    from nodes.engine.pipelines import resolve_dtype, text_encoder_dtype

    manager = ctx.models
    device = manager.text_encoder_device or manager.device
    dtype = text_encoder_dtype(resolve_dtype(dtype_name, device), device)

    def load(placement: Any) -> ResidentClipVision:
        where = "cpu" if placement.offload else device
        try:
            return ResidentClipVision(load_model(ref, text_encoder_dtype(dtype, where), where), where)
        except Exception as exc:  # a file changed since CLIPVisionLoader read its header, a damaged file
            raise NodeFailure(f"{ref.name}: cannot be loaded: {type(exc).__name__}: {str(exc)[:200]}",
                              "clip_vision", "bad_clip_vision") from None

    size = sum(math.prod(s) for s in read_header(ref.path).shapes.values()) * dtype.itemsize
    key = ("clip_vision", ref.path, ref.fingerprint, str(dtype), device)
    with manager.use(key, load, size, ref.name, ctx.info) as resident:
        yield resident


def preprocess(image: torch.Tensor, size: int) -> torch.Tensor:
    """IMAGE (batch, H, W, 3) in 0..1 to CLIP's pixels: shortest side to `size` (bicubic), centre crop, normalize."""
    x = image.movedim(-1, 1).float()
    height, width = x.shape[-2:]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        new = (max(size, round(height * scale)), max(size, round(width * scale)))
        x = torch.nn.functional.interpolate(x, size=new, mode="bicubic", antialias=True).clamp(0, 1)
        top, left = (new[0] - size) // 2, (new[1] - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def encode(model: Any, image: torch.Tensor, hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The IMAGE batch's embeddings for an adapter's image projection, float32 on the CPU, and the negative side's.

    `hidden` false: the projected image embeddings (images, width); the negative is None (zeros). `hidden` true
    (IP-Adapter Plus/Full): the penultimate layer's hidden states (images, tokens, width), and as the negative
    those of all-zero pixel values, as diffusers' pipelines compute them.
    """
    parameter = next(model.parameters())
    with torch.inference_mode():
        pixels = preprocess(image[..., :3].float(), model.config.image_size).to(parameter.device, parameter.dtype)
        if not hidden:
            return model(pixel_values=pixels).image_embeds.float().cpu(), None
        states = [model(pixel_values=p, output_hidden_states=True).hidden_states[-2].float().cpu()
                  for p in (pixels, torch.zeros_like(pixels))]
        return states[0], states[1]
