"""The real CLIP vocabulary comes with the install, so a user's first real checkpoint runs offline; a tokenizer that
is still missing (another vocabulary, T5's) is a validation error on the loader's input, never an exception."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nodegraph.executor import Executor
from nodegraph.models import ModelManager
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodegraph.validate import validate
from nodes.engine import clip_tokenizers
from tests.conftest import workflow
from tests.nodes.test_checkpoints import real_size_file

BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"  # OpenAI CLIP's file


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing but the install: no NODEGRAPH_CLIP_BPE, an empty HF cache, no open_clip on the path."""
    monkeypatch.delenv("NODEGRAPH_CLIP_BPE", raising=False)
    monkeypatch.delenv("NODEGRAPH_T5_TOKENIZER", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # derived config folders: made afresh
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if not (Path(p) / "open_clip").is_dir()])


@pytest.fixture
def no_clip_vocabulary(offline: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """An install whose carried vocabulary was removed."""
    monkeypatch.setattr(clip_tokenizers, "_clip_bpe_candidates", lambda: [])


def test_the_real_clip_tokenizer_comes_with_the_install(offline: None, tmp_path: Path) -> None:
    assert hashlib.sha256(clip_tokenizers.BUNDLED_CLIP_BPE.read_bytes()).hexdigest() == BPE_SHA256
    assert "MIT" in (clip_tokenizers.BUNDLED_CLIP_BPE.parent / "LICENSE-CLIP-BPE").read_text()
    path = real_size_file(tmp_path / "real.safetensors", "sd15")  # a header claiming CLIP-L's 49408 tokens
    tokenizer = clip_tokenizers.tokenizer_for(path, 49408, "<|endoftext|>")
    assert len(tokenizer) == 49408
    # OpenAI CLIP's own ids for these prompts.
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("an astronaut riding a horse")["input_ids"] == [49406, 550, 18376, 6765, 320, 4558, 49407]
    assert clip_tokenizers.missing_tokenizer(path) is None


def with_clip_vocabulary(source: Path, target: Path, size: int = 49408) -> Path:
    """The demo SD1.5 single file with its text encoder's token embedding grown to `size` rows (a real checkpoint's
    vocabulary on a tiny model: 6 MB more, not a full-size file)."""
    with safe_open(str(source), "pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    key = next(k for k in tensors if k.endswith("token_embedding.weight"))
    small = tensors[key]
    grown = torch.randn(size, small.shape[1], generator=torch.Generator().manual_seed(0)) * small.std()
    grown[: small.shape[0]] = small
    tensors[key] = grown
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata=metadata)
    return target


def comfy_graph(checkpoint: str) -> dict[str, Any]:
    return workflow({
        "ckpt": {"type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "pos": {"type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["ckpt", "CLIP"]}},
        "neg": {"type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", "CLIP"]}},
        "lat": {"type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "ks": {"type": "KSampler", "inputs": {"model": ["ckpt", "MODEL"], "positive": ["pos", 0],
                                              "negative": ["neg", 0], "latent_image": ["lat", 0], "seed": 1,
                                              "steps": 2, "cfg": 7.0, "sampler_name": "euler",
                                              "scheduler": "normal", "denoise": 1.0}},
        "dec": {"type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["ckpt", "VAE"]}},
        "save": {"type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": "first"}},
    })


@pytest.fixture
def real_vocab_models(tmp_path: Path, demo_dir: Path) -> Settings:
    own = tmp_path / "models"
    with_clip_vocabulary(demo_dir / "checkpoints" / "tiny-sd15.safetensors",
                         own / "checkpoints" / "real-vocab-sd15.safetensors")
    return Settings(models_dirs=(own, demo_dir), output_dir=tmp_path / "outputs")


def test_a_checkpoint_with_the_real_clip_vocabulary_runs_offline(
        offline: None, registry: Registry, real_vocab_models: Settings) -> None:
    executor = Executor(registry, real_vocab_models, models=ModelManager(device="cpu"))
    result = executor.run(comfy_graph("real-vocab-sd15.safetensors"))
    assert result.status == "ok", result.errors
    assert [Path(f).name for f in result.files] == ["first_00001_.png"]


def test_a_missing_clip_vocabulary_is_a_validation_error_on_the_loader(
        no_clip_vocabulary: None, registry: Registry, real_vocab_models: Settings) -> None:
    graph, problems = validate(comfy_graph("real-vocab-sd15.safetensors"), registry, real_vocab_models)
    assert graph is None
    assert [(p.node_id, p.input, p.code) for p in problems] == [("ckpt", "ckpt_name", "missing_tokenizer")]
    message = problems[0].message
    assert message.startswith("real-vocab-sd15.safetensors: ") and "49408" in message
    assert str(real_vocab_models.models_dirs[0]) not in message  # the file's name, not where it lives
    executor = Executor(registry, real_vocab_models, models=ModelManager(device="cpu"))
    assert executor.run(comfy_graph("real-vocab-sd15.safetensors")).status == "invalid"


def fake_t5(path: Path, vocab: int = 32128) -> Path:
    """A T5 encoder file's header (small widths; the vocabulary is the real T5's), enough to tell what it needs."""
    width, heads = 8, 2
    tensors = {"shared.weight": torch.zeros(vocab, width),
               "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": torch.zeros(32, heads),
               "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(width, width),
               "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": torch.zeros(16, width),
               "encoder.final_layer_norm.weight": torch.zeros(width)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def test_a_missing_t5_tokenizer_is_a_validation_error_on_its_input(
        offline: None, registry: Registry, demo_dir: Path, tmp_path: Path) -> None:
    own = tmp_path / "models"
    fake_t5(own / "text_encoders" / "t5xxl.safetensors")
    settings = Settings(models_dirs=(own, demo_dir), output_dir=tmp_path / "outputs")
    wf = workflow({
        "c": {"type": "DualCLIPLoader", "inputs": {"clip_name1": "tiny-flux-clip_l.safetensors",
                                                   "clip_name2": "t5xxl.safetensors", "type": "flux"}},
        "e": {"type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["c", "CLIP"]}},
        "s": {"type": "Show", "inputs": {"value": ["e", 0]}},
    })
    graph, problems = validate(wf, registry, settings)
    assert graph is None
    assert [(p.node_id, p.input, p.code) for p in problems] == [("c", "clip_name2", "missing_tokenizer")]
    assert problems[0].message.startswith("t5xxl.safetensors: ") and str(own) not in problems[0].message
