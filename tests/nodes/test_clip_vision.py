"""CLIP vision files as ComfyUI users have them (transformers' keys, optionally prefixed, or OpenCLIP's; no
config: the config derived from the shapes), unknown layouts named, and the encoder as a model-manager resident."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from nodegraph.executor import Executor
from nodegraph.models import ModelManager
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodes.engine import clip_vision
from nodes.engine.clip_vision import ClipVisionError, derive_config, read_vision_file
from tests.nodes.test_ipadapter import graph

# 128 wide: two 64-wide heads, which is what the shapes tell for a width outside the released encoders'.
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": 32, "patch_size": 8, "projection_dim": 48, "num_channels": 3, "hidden_act": "quick_gelu"}
# The released encoders ComfyUI knows (OpenAI ViT-L/14 and its 336 px version, OpenCLIP ViT-H/14 and bigG/14).
RELEASED = {
    "vit-l-14": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "image_size": 224, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"},
    "vit-l-14-336": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                     "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768,
                     "hidden_act": "quick_gelu"},
    "vit-h-14": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
                 "image_size": 224, "patch_size": 14, "projection_dim": 1024, "hidden_act": "gelu"},
    "vit-bigg-14": {"hidden_size": 1664, "intermediate_size": 8192, "num_hidden_layers": 48,
                    "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "projection_dim": 1280,
                    "hidden_act": "gelu"},
}


def tiny_model() -> Any:
    torch.manual_seed(3)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY)).eval()


def picture(tmp_path: Path) -> Path:
    """An input folder with face.png (the picture test_ipadapter.py's graph loads)."""
    from PIL import Image

    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32), (10, 120, 200)).save(tmp_path / "in" / "face.png")
    return tmp_path / "in"


def write(path: Path, model: Any, prefix: str = "", extra: dict[str, torch.Tensor] | None = None) -> Path:
    """The model's weights as one .safetensors with no config, keys under `prefix`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    save_file({**state, **(extra or {})}, path)
    return path


@pytest.mark.parametrize("prefix", ["", "clip_vision.", "model."])
def test_a_comfyui_file_loads_with_the_config_from_its_shapes(tmp_path: Path, prefix: str) -> None:
    model = tiny_model()
    # A whole CLIP model's file has text-model keys too; old files keep the position_ids buffer: both ignored.
    extra = {"text_model.embeddings.token_embedding.weight": torch.zeros(10, 8),
             prefix + "vision_model.embeddings.position_ids": torch.arange(17)[None]}
    path = write(tmp_path / "clip_vision" / "CLIP-ViT-tiny.safetensors", model, prefix, extra)
    ref = read_vision_file(path, "f")
    assert ref.prefix == prefix and all(ref.config[k] == v for k, v in TINY.items())
    loaded = clip_vision.load_model(ref, torch.float32, "cpu")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        want, got = (m(pixel_values=pixels, output_hidden_states=True) for m in (model, loaded))
    torch.testing.assert_close(got.image_embeds, want.image_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.hidden_states[-2], want.hidden_states[-2], atol=1e-6, rtol=0)


def openclip_state(model: Any, prefix: str) -> dict[str, torch.Tensor]:
    """The model's weights under OpenCLIP's names (open_clip's VisionTransformer: a fused in_proj per layer,
    `proj` as width × output)."""
    sd, state = model.state_dict(), {}
    e, layers = "vision_model.embeddings.", model.config.num_hidden_layers
    state.update(class_embedding=sd[e + "class_embedding"], positional_embedding=sd[e + "position_embedding.weight"])
    state["conv1.weight"], state["proj"] = sd[e + "patch_embedding.weight"], sd["visual_projection.weight"].T
    for part in ("weight", "bias"):
        state[f"ln_pre.{part}"] = sd[f"vision_model.pre_layrnorm.{part}"]
        state[f"ln_post.{part}"] = sd[f"vision_model.post_layernorm.{part}"]
        for i in range(layers):
            ours, theirs = f"vision_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
            state[f"{theirs}attn.in_proj_{part}"] = torch.cat([sd[f"{ours}self_attn.{q}_proj.{part}"] for q in "qkv"])
            for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                state[f"{theirs}{b}.{part}"] = sd[f"{ours}{a}.{part}"]
    return {prefix + k: v.contiguous() for k, v in state.items()}


def test_an_openclip_layout_file_loads_to_the_same_model(tmp_path: Path) -> None:
    model = tiny_model()
    text_tower = {"transformer.resblocks.0.attn.in_proj_weight": torch.zeros(24, 8)}  # open_clip's text side
    save_file({**openclip_state(model, "visual."), **text_tower}, tmp_path / "open_clip_model.safetensors")
    ref = read_vision_file(tmp_path / "open_clip_model.safetensors", "f")
    assert (ref.prefix, ref.layout) == ("visual.", "openclip") and all(ref.config[k] == v for k, v in TINY.items())
    loaded = clip_vision.load_model(ref, torch.float32, "cpu")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        want, got = (m(pixel_values=pixels, output_hidden_states=True) for m in (model, loaded))
    torch.testing.assert_close(got.image_embeds, want.image_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.hidden_states[-2], want.hidden_states[-2], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_the_released_layouts_configs_from_their_shapes(name: str) -> None:
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**RELEASED[name]))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    derived = derive_config(name, shapes)
    assert {k: derived[k] for k in RELEASED[name]} == RELEASED[name]


def test_unknown_layouts_are_validation_errors_naming_the_file(registry: Registry, demo_dir: Path,
                                                               tmp_path: Path) -> None:
    folder = tmp_path / "clip_vision"
    folder.mkdir()
    save_file({"foo.weight": torch.zeros(2)}, folder / "odd.safetensors")
    save_file({"visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(6, 2),
               "visual.conv1.weight": torch.zeros(2, 3, 8, 8)}, folder / "openclip.safetensors")  # a stub
    narrow = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY, "hidden_size": 40, "num_attention_heads": 2}))
    write(folder / "narrow.safetensors", narrow)  # 40 wide: no rule says how many heads
    state = {k: v.contiguous() for k, v in tiny_model().state_dict().items()}
    state.pop("vision_model.encoder.layers.1.mlp.fc2.weight")
    save_file(state, folder / "short.safetensors")
    executor = Executor(registry, Settings(models_dirs=(tmp_path, demo_dir), input_dir=picture(tmp_path),
                                           output_dir=tmp_path / "out"))
    for file, words in [("odd.safetensors", "not a CLIP vision model"),
                        ("openclip.safetensors", "not a CLIPVisionModelWithProjection's weights"),
                        ("narrow.safetensors", "unknown CLIP vision layout"),
                        ("short.safetensors", "layers.1.mlp.fc2.weight is missing")]:
        wf = graph(1.0)
        wf["nodes"]["vision"]["inputs"]["clip_name"] = file
        result = executor.run(wf)
        assert [(e.node_id, e.input, e.code) for e in result.errors] == [("vision", "clip_name", "bad_clip_vision")]
        assert file in result.errors[0].message and words in result.errors[0].message, result.errors[0].message
    with pytest.raises(ClipVisionError, match="config"):
        bad = folder / "bad-config.safetensors"
        save_file(state, bad, metadata={clip_vision.CONFIG_KEY: json.dumps({"hidden_size": "wide"})})
        read_vision_file(bad, "f")


def test_the_encoder_is_a_resident_of_the_model_manager(registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    """Loaded once through the manager on its device, counted in its memory, evicted by a clear and loaded again."""
    manager = ModelManager(device="cpu")
    executor = Executor(registry, Settings(models_dirs=(demo_dir,), input_dir=picture(tmp_path),
                                           output_dir=tmp_path / "out"), models=manager)
    first = executor.run(graph(0.8))
    assert first.status == "ok", first.errors
    [encoder] = [e for e in manager.resident() if e.key[0] == "clip_vision"]
    assert encoder.device == "cpu" and encoder.key[3] == str(torch.float32)
    params = sum(p.numel() * 4 for p in encoder.value.model.parameters())
    assert encoder.memory["cpu"] >= params > 0 and manager.used("cpu") >= encoder.memory["cpu"]
    assert any(m["name"] == "tiny-clip-vision.safetensors" for m in manager.status()["residents"])
    executor.free_memory()
    assert not [e for e in manager.resident() if e.key[0] == "clip_vision"]
    again = executor.run(graph(0.9))  # a new weight: IPAdapterApply runs again, the encoder loads again
    assert again.status == "ok", again.errors
    assert [e for e in manager.resident() if e.key[0] == "clip_vision"]
    embeds = first.nodes["apply"].outputs["MODEL"].ip_adapter.embeds
    assert again.nodes["apply"].outputs["MODEL"].ip_adapter.embeds == embeds
