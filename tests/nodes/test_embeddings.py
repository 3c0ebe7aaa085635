"""LoadEmbedding: prompts with an embedding encode as diffusers' load_textual_inversion + encode_prompt do, on
SD1.5 and SDXL; prompts without it are unchanged on a pipeline that loaded one; bad files are named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from nodegraph.cli import main
from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodes.engine.checkpoints import load_pipeline
from tests.conftest import Recorder, workflow

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def shared(registry: Registry, demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    return Executor(registry, Settings(models_dirs=(demo_dir,), output_dir=tmp_path_factory.mktemp("out")))


def encode(executor: Executor, checkpoint: str, text: str, embedding: str | None = None) -> Any:
    nodes: dict[str, Any] = {"ckpt": {"type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}}
    clip = ["ckpt", "CLIP"]
    if embedding:
        nodes["emb"] = {"type": "LoadEmbedding", "inputs": {"clip": clip, "embedding": embedding}}
        clip = ["emb", "CLIP"]
    nodes["enc"] = {"type": "CLIPTextEncode", "inputs": {"text": text, "clip": clip}}
    nodes["show"] = {"type": "Show", "inputs": {"value": ["enc", 0]}}
    result = executor.run(workflow(nodes), Recorder())
    assert result.status == "ok", result.errors
    return result.nodes["show"].outputs["value"].entries[0]


def test_sd15_embedding_encodes_as_diffusers_does(shared: Executor, demo_dir: Path) -> None:
    pipe = load_pipeline(demo_dir / "checkpoints" / "tiny-sd15")
    tensors = load_file(demo_dir / "embeddings" / "tiny-sd15-embedding.safetensors")
    pipe.load_textual_inversion(tensors, token="<tiny>")
    want = pipe.encode_prompt("a <tiny> castle", "cpu", 1, False)[0]
    for text in ("a embedding:tiny-sd15-embedding castle", "a <tiny-sd15-embedding> castle",
                 "a embedding:tiny-sd15-embedding.safetensors castle"):
        got = encode(shared, "tiny-sd15", text, "tiny-sd15-embedding.safetensors").embeds
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    plain = encode(shared, "tiny-sd15", "a castle")  # same resident, embedding still loaded
    torch.testing.assert_close(plain.embeds, pipe.encode_prompt("a castle", "cpu", 1, False)[0], atol=1e-6, rtol=0)
    assert not torch.allclose(plain.embeds, want)


def test_sdxl_embedding_goes_into_both_text_encoders(shared: Executor, demo_dir: Path) -> None:
    pipe = load_pipeline(demo_dir / "checkpoints" / "tiny-sdxl")
    tensors = load_file(demo_dir / "embeddings" / "tiny-sdxl-embedding.safetensors")
    pipe.load_textual_inversion({"emb_params": tensors["clip_l"]}, token="<t>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion({"emb_params": tensors["clip_g"]}, token="<t>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    embeds, _, pooled, _ = pipe.encode_prompt("a <t> castle", device="cpu",
                                              num_images_per_prompt=1, do_classifier_free_guidance=False)
    got = encode(shared, "tiny-sdxl", "a embedding:tiny-sdxl-embedding castle", "tiny-sdxl-embedding.safetensors")
    torch.testing.assert_close(got.embeds, embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooled, pooled, atol=1e-5, rtol=1e-5)


def test_errors_name_the_input(shared: Executor, demo_dir: Path, tmp_path: Path, registry: Registry) -> None:
    nodes = {"ckpt": {"type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15"}},
             "emb": {"type": "LoadEmbedding", "inputs": {"clip": ["ckpt", "CLIP"],
                                                          "embedding": "tiny-sdxl-embedding.safetensors"}},
             "show": {"type": "Show", "inputs": {"value": ["emb", 0]}}}
    result = shared.run(workflow(nodes))
    assert [(e.node_id, e.input, e.code) for e in result.errors] == [("emb", "embedding", "wrong_model")]
    assert "SDXL" in result.errors[0].message
    nodes = {"ckpt": nodes["ckpt"], "enc": {"type": "CLIPTextEncode", "inputs": {"text": "embedding:nope",
                                                                                  "clip": ["ckpt", "CLIP"]}},
             "show": {"type": "Show", "inputs": {"value": ["enc", 0]}}}
    result = shared.run(workflow(nodes))
    assert [(e.node_id, e.input, e.code) for e in result.errors] == [("enc", "text", "unknown_embedding")]
    (tmp_path / "embeddings").mkdir()
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, tmp_path / "embeddings" / "odd.safetensors")
    odd = Executor(registry, Settings(models_dirs=(tmp_path, demo_dir), output_dir=tmp_path / "out"))
    result = odd.run(workflow({"ckpt": nodes["ckpt"], "emb": {"type": "LoadEmbedding", "inputs": {
        "clip": ["ckpt", "CLIP"], "embedding": "odd.safetensors"}}, "show": {"type": "Show", "inputs": {
        "value": ["emb", 0]}}}))
    assert [(e.node_id, e.input, e.code) for e in result.errors] == [("emb", "embedding", "bad_embedding")]


def test_embedding_workflow_runs_headless(demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(ROOT / "workflows" / "embedding.json"), "--models-dir", str(demo_dir), "--output-dir",
                 str(tmp_path), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["status"] == "ok", result["errors"]
    assert result["files"]


@pytest.mark.parametrize("checkpoint, family", [("tiny-sd15", "sd15"), ("tiny-sdxl", "sdxl")])
def test_a_misspelt_embedding_lists_those_for_the_clips_model_first(registry: Registry, demo_dir: Path,
                                                                    checkpoint: str, family: str) -> None:
    from nodegraph.validate import validate

    wf = workflow({"c": {"type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
                   "e": {"type": "LoadEmbedding", "inputs": {"clip": ["c", 1], "embedding": "tiny.safetensors"}},
                   "s": {"type": "Show", "inputs": {"value": ["e", 0]}}})
    _, [problem] = validate(wf, registry, Settings(models_dirs=(demo_dir,)))
    assert (problem.node_id, problem.input, problem.code) == ("e", "embedding", "not_a_choice")
    assert f"this {family} model: '{checkpoint}-embedding.safetensors'; for other models: " in problem.message
