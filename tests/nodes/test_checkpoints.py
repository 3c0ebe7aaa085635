"""Checkpoint inspection and offline loading: family detection from headers, configs derived from shapes
(checked against real full-size SD 1.5 / 2.1 / SDXL layouts built on the meta device), tokenizers, and
clear refusals of pickles and damaged files.

    pytest tests/nodes/test_checkpoints.py
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers is imported: a missing file must fail, not retry

import gzip
import json
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nodes.engine import clip_tokenizers
from nodes.engine.checkpoints import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    MissingTokenizerError,
    NotADiffusionCheckpointError,
    UnknownFamilyError,
    UnsafeFormatError,
    detect_family,
    load_pipeline,
    read_header,
)
from nodes.engine.clip_tokenizers import clip_tokenizer_from_bpe
from nodes.engine.demo_models import (
    build_sdxl_pipeline,
    components_to_ldm_state_dict,
    make_demo_models,
    write_single_file,
)
from nodes.engine.single_file_configs import single_file_config_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo-models")
    make_demo_models(root)
    write_single_file(build_sdxl_pipeline(0), root / "checkpoints" / "tiny-sdxl.safetensors")
    return root


@pytest.fixture(scope="module")
def fake_clip_bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file in the format of OpenAI's bpe_simple_vocab_16e6.txt.gz, with made-up merges."""
    alphabet = clip_tokenizers.bytes_to_unicode()
    count = clip_tokenizers.CLIP_VOCAB_SIZE - 2 * 256 - 2
    pairs = (f"{a} {b}" for a in alphabet for b in [*alphabet, *(c + "</w>" for c in alphabet)])
    lines = ["#version: 0.2", *(next(pairs) for _ in range(count))]
    path = tmp_path_factory.mktemp("bpe") / "bpe_simple_vocab_16e6.txt.gz"
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    return path


def checkpoint(models: Path, name: str) -> Path:
    return models / "checkpoints" / name


# ---------------------------------------------------------------------------------------------- family


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("tiny-sd15", "sd15"),
        ("tiny-sd15.safetensors", "sd15"),
        ("tiny-sdxl", "sdxl"),
        ("tiny-sdxl.safetensors", "sdxl"),
    ],
)
def test_detects_the_demo_families(models: Path, name: str, family: str) -> None:
    assert detect_family(checkpoint(models, name)) == family


def test_detects_sd2_and_refiner_folders(tmp_path: Path) -> None:
    sd2 = tmp_path / "sd2"
    (sd2 / "unet").mkdir(parents=True)
    (sd2 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (sd2 / "unet" / "config.json").write_text(json.dumps({"use_linear_projection": True}))
    assert detect_family(sd2) == "sd2"
    refiner = tmp_path / "refiner"
    refiner.mkdir()
    index = {"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None]}
    (refiner / "model_index.json").write_text(json.dumps(index))
    assert detect_family(refiner) == "sdxl-refiner"


def sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None) -> Path:
    """A valid safetensors file of any size whose tensor bytes are a hole: only the header is real."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    return path


# Real full-size architectures (diffusers' published configs), built without memory on the meta device.
SD15_UNET = {
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD2_UNET = {
    **SD15_UNET,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
}
SDXL_UNET = {
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
OPEN_CLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16}
OPEN_CLIP_BIG_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20}
SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2}


def real_size_file(path: Path, family: str) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def clip(config: dict[str, int], projection: bool, act: str) -> torch.nn.Module:
        cfg = CLIPTextConfig(vocab_size=49408, projection_dim=config["hidden_size"], hidden_act=act, **config)
        return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)

    with torch.device("meta"):
        unet = UNet2DConditionModel(**{"sd15": SD15_UNET, "sd2": SD2_UNET, "sdxl": SDXL_UNET}[family])
        levels = len(SD_VAE["block_out_channels"])
        vae = AutoencoderKL(
            **SD_VAE,
            down_block_types=["DownEncoderBlock2D"] * levels,
            up_block_types=["UpDecoderBlock2D"] * levels,
        )
        if family == "sd15":
            text = {"cond_stage_model.transformer.": clip(CLIP_L, False, "quick_gelu")}
        elif family == "sd2":
            text = {"cond_stage_model.model.": clip(OPEN_CLIP_H, True, "gelu")}
        else:
            text = {
                "conditioner.embedders.0.transformer.": clip(CLIP_L, False, "quick_gelu"),
                "conditioner.embedders.1.model.": clip(OPEN_CLIP_BIG_G, True, "gelu"),
            }
    state = components_to_ldm_state_dict(unet, vae, text)
    return sparse_safetensors(path, {k: tuple(v.shape) for k, v in state.items()})


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_derives_real_full_size_configs_from_the_header(
    family: str, tmp_path: Path, fake_clip_bpe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NODEGRAPH_CLIP_BPE", str(fake_clip_bpe))
    path = real_size_file(tmp_path / f"{family}.safetensors", family)
    assert path.stat().st_size > 2 * 10**9  # a sparse file: nothing but the header was written or is read
    assert detect_family(path) == family

    folder = single_file_config_dir(path, read_header(path), family, tmp_path / "cache")
    unet = json.loads((folder / "unet" / "config.json").read_text())
    expected_unet = {"sd15": SD15_UNET, "sd2": SD2_UNET, "sdxl": SDXL_UNET}[family]
    assert {k: unet[k] for k in expected_unet} == expected_unet
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert {k: vae[k] for k in SD_VAE} == SD_VAE
    assert vae["scaling_factor"] == (0.13025 if family == "sdxl" else 0.18215)

    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    expected_text = CLIP_L if family != "sd2" else {**OPEN_CLIP_H, "num_hidden_layers": 23}  # SD2 skips the last
    assert {k: text[k] for k in expected_text} == expected_text
    index = json.loads((folder / "model_index.json").read_text())
    if family == "sdxl":
        text_2 = json.loads((folder / "text_encoder_2" / "config.json").read_text())
        assert {k: text_2[k] for k in OPEN_CLIP_BIG_G} == OPEN_CLIP_BIG_G
        assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
        assert text_2["pad_token_id"] == 0  # OpenCLIP pads with "!", id 0 in the real vocabulary
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
    tokenizer = json.loads((folder / "tokenizer" / "tokenizer.json").read_text())
    assert len(tokenizer["model"]["vocab"]) == 49408
    assert not [p for p in folder.rglob("*") if "safetensors" in p.name]  # configs only, no weights


def test_real_vocabulary_without_clip_files_says_how_to_get_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NODEGRAPH_CLIP_BPE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(clip_tokenizers, "_clip_bpe_candidates", lambda: [])  # in case open_clip is installed
    path = real_size_file(tmp_path / "real.safetensors", "sd15")
    with pytest.raises(MissingTokenizerError, match="open-clip-torch") as info:
        load_pipeline(path, cache_dir=tmp_path / "cache")
    assert "real.safetensors" in str(info.value)


def test_clip_tokenizer_from_bpe_follows_clip_vocabulary_order(fake_clip_bpe: Path) -> None:
    tokenizer = clip_tokenizer_from_bpe(fake_clip_bpe, "!")
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 0)
    assert tokenizer.convert_tokens_to_ids(["!", "a</w>"]) == [0, 256 + ord("a") - ord("!")]


# ---------------------------------------------------------------------------------------------- loading


def test_single_file_configs_are_cached_by_header(models: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for _ in range(2):
        pipe = load_pipeline(checkpoint(models, "tiny-sd15.safetensors"), cache_dir=cache)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.safety_checker is None
    load_pipeline(checkpoint(models, "tiny-sdxl.safetensors"), cache_dir=cache)
    folders = sorted(p.name for p in cache.iterdir())
    assert len(folders) == 2 and folders[0].startswith("sd15-") and folders[1].startswith("sdxl-")


def folder_tensors(folder: Path, component: str) -> dict[str, torch.Tensor]:
    with safe_open(next((folder / component).glob("*.safetensors")), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)


def test_loads_in_the_requested_dtype(models: Path, tmp_path: Path) -> None:
    expected = folder_tensors(checkpoint(models, "tiny-sd15"), "unet")
    for name in ("tiny-sd15", "tiny-sd15.safetensors"):
        pipe = load_pipeline(checkpoint(models, name), torch.bfloat16, cache_dir=tmp_path)
        assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
        state = pipe.unet.state_dict()
        assert all(torch.equal(state[key], value.to(torch.bfloat16)) for key, value in expected.items())


# Every torch.nn.init function (and every hand-written init) ends in one of these in-place random fills.
_RANDOM_FILLS = ("normal_", "uniform_", "bernoulli_", "exponential_", "geometric_", "cauchy_", "log_normal_", "random_")


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sd15.safetensors", "tiny-sdxl", "tiny-sdxl.safetensors"])
def test_loading_makes_no_random_weights(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    filled: list[str] = []
    for method in _RANDOM_FILLS:
        original = getattr(torch.Tensor, method)

        def fill(self: torch.Tensor, *args: Any, _method: str = method, _original: Any = original, **kw: Any) -> Any:
            if self.device.type != "meta":  # init on the meta device allocates and draws nothing
                filled.append(f"{_method} {tuple(self.shape)}")
            return _original(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, method, fill)
    pipe = load_pipeline(checkpoint(models, name), cache_dir=tmp_path)
    assert filled == []
    assert pipe.unet.device.type == "cpu"


def mapped_files(tensors: list[torch.Tensor]) -> list[str | None]:
    """The file each tensor's memory is mapped from, per /proc/self/maps; None for private memory."""
    regions = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        regions.append((start, end, fields[5] if len(fields) == 6 else None))
    return [next((name for start, end, name in regions if start <= t.data_ptr() < end), None) for t in tensors]


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the memory map from Linux's /proc")
@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sd15.safetensors"])
def test_weights_are_the_files_tensors_mapped_not_copied(models: Path, tmp_path: Path, name: str) -> None:
    path = checkpoint(models, name)
    pipe = load_pipeline(path, torch.float32, cache_dir=tmp_path)
    folder = checkpoint(models, "tiny-sd15")  # the single file holds the same weights in the ldm layout
    for component in ("unet", "vae", "text_encoder"):
        state = getattr(pipe, component).state_dict()
        expected = folder_tensors(folder, component)
        assert expected.keys() <= state.keys()
        assert all(torch.equal(state[key], value) for key, value in expected.items()), component
    # A weight stored in the load dtype is a view of the file's pages: loading copied nothing.
    weights = [t for m in (pipe.unet, pipe.vae, pipe.text_encoder) for t in m.parameters()]
    files = {str(f.resolve()) for f in ([path] if path.is_file() else path.rglob("*.safetensors"))}
    assert set(mapped_files(weights)) <= files


# ---------------------------------------------------------------------------------------------- refusals


class _Payload:
    """Unpickling this creates the marker file: proof that nothing was unpickled if the file is absent."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.pth", "model.bin", "model.pkl"])
def test_refuses_pickle_formats_without_unpickling(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(_Payload(marker)))
    for call in (detect_family, load_pipeline):
        with pytest.raises(UnsafeFormatError, match="pickle") as info:
            call(path)
        assert name in str(info.value) and isinstance(info.value, ValueError)
    assert not marker.exists()


def test_refuses_a_pickle_or_zip_disguised_as_safetensors(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    disguised = tmp_path / "pickle.safetensors"
    disguised.write_bytes(pickle.dumps(_Payload(marker)))
    archive = tmp_path / "zip.safetensors"
    with zipfile.ZipFile(archive, "w") as z:  # the torch.save format
        z.writestr("archive/data.pkl", pickle.dumps(_Payload(marker)))
    for path in (disguised, archive):
        with pytest.raises(UnsafeFormatError, match=path.name):
            load_pipeline(path)
    assert not marker.exists()


def test_refuses_other_formats_and_missing_paths(tmp_path: Path) -> None:
    other = tmp_path / "model.onnx"
    other.write_bytes(b"\x00" * 16)
    with pytest.raises(UnsafeFormatError, match="model.onnx"):
        detect_family(other)
    with pytest.raises(CheckpointNotFoundError, match="missing.safetensors") as info:
        load_pipeline(tmp_path / "missing.safetensors")
    assert isinstance(info.value, FileNotFoundError)


def test_folder_with_pickled_weights_is_refused(models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(checkpoint(models, "tiny-sd15"), folder)
    marker = tmp_path / "unpickled"
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="pickled.*safetensors"):
        load_pipeline(folder)
    assert not marker.exists()


def reshaped(good: bytes) -> bytes:
    """The same file with one tensor's shape changed, so its byte range no longer fits."""
    header_len = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + header_len])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"][0] += 1
    raw = json.dumps(header).encode()  # offsets count from the end of the header: its length may change
    return len(raw).to_bytes(8, "little") + raw + good[8 + header_len :]


@pytest.mark.parametrize(
    "damage",
    [
        "truncated",
        "trailing bytes",
        "empty",
        "garbage",
        "header length past the end",
        "header not json",
        "offsets disagree with shape",
    ],
)
def test_corrupt_files_get_a_clear_error(models: Path, tmp_path: Path, damage: str) -> None:
    good = checkpoint(models, "tiny-sd15.safetensors").read_bytes()
    header_len = int.from_bytes(good[:8], "little")
    damaged = {
        "truncated": lambda: good[: len(good) // 2],
        "trailing bytes": lambda: good + b"\x00" * 16,
        "empty": lambda: b"",
        "garbage": lambda: os.urandom(4096),
        "header length past the end": lambda: (10**9).to_bytes(8, "little") + good[8:],
        "header not json": lambda: good[:8] + b"{" * header_len + good[8 + header_len :],
        "offsets disagree with shape": lambda: reshaped(good),
    }[damage]()
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(damaged)
    with pytest.raises(CorruptCheckpointError, match="damaged.safetensors"):
        load_pipeline(path)


def test_files_that_are_not_checkpoints(models: Path, tmp_path: Path) -> None:
    with pytest.raises(NotADiffusionCheckpointError, match="LoRA"):
        detect_family(models / "loras" / "tiny-sd15-style.safetensors")
    tensors = tmp_path / "tensors.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, tensors)
    with pytest.raises(NotADiffusionCheckpointError, match="tensors.safetensors"):
        load_pipeline(tensors)
    with pytest.raises(NotADiffusionCheckpointError, match="model_index.json"):
        load_pipeline(tmp_path)


def test_unknown_families_are_named(tmp_path: Path) -> None:
    lone_unet = sparse_safetensors(
        tmp_path / "unet.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": (4,)}
    )
    with pytest.raises(UnknownFamilyError, match="unet.safetensors"):
        detect_family(lone_unet)
    sd3 = sparse_safetensors(
        tmp_path / "sd3.safetensors",
        {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (4,)},
    )
    assert detect_family(sd3) == "sd3"
    with pytest.raises(UnknownFamilyError, match="sd3"):
        load_pipeline(sd3, cache_dir=tmp_path / "cache")
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UnknownFamilyError, match="KandinskyPipeline"):
        detect_family(folder)


def test_a_header_length_whose_low_byte_is_0x80_is_not_taken_for_a_pickle(tmp_path: Path) -> None:
    header = json.dumps({"__metadata__": {"note": "padding"}}).encode().ljust(0x180)  # 0x80 is a pickle's first byte
    path = tmp_path / "lucky.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    assert path.read_bytes()[0] == 0x80
    assert read_header(path).metadata == {"note": "padding"}
