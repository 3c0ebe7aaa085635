"""LoadEmbedding: a textual-inversion embedding added to a CLIP recipe, for CLIPTextEncode's prompts.

The node only checks the file (safetensors, a layout it knows, vectors as wide as the model's text
encoders) and returns a new CLIP recipe; the embedding is loaded into the pipeline when a prompt is
encoded (nodes/engine/embeddings.py).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from nodegraph.cache import file_fingerprint
from nodegraph.context import Context, NodeFailure
from nodegraph.schema import Input, Node, Output
from nodegraph.settings import ModelChoices
from nodes.engine.recipe import Embedding, ModelRecipe
from nodes.model_files import fit_hint, model_file


def _widths(checkpoint: str, fingerprint: str) -> dict[str, int]:
    """Each text encoder's width: the input size of its attention projections."""
    from nodes.engine import lora_match

    modules = lora_match.model_layers(checkpoint, fingerprint).modules
    return {c: next(size[0] for m, size in modules[c].items() if m.endswith("self_attn.q_proj"))
            for c in ("text_encoder", "text_encoder_2") if c in modules}


def _fits(checkpoint: Path, fingerprint: str, path: Path) -> bool:
    from nodes.engine import embeddings

    return embeddings.problem(embeddings.read(path), _widths(str(checkpoint), fingerprint), path.name) is None


_embeddings = ModelChoices("embeddings", hint=fit_hint("embeddings", _fits))
_NAME = re.compile(r"^[\w.-]{1,64}$")


class LoadEmbedding(Node):
    type = "LoadEmbedding"
    version = "1.0.0"
    category = "conditioning"
    description = ("Adds a textual-inversion embedding (A1111/diffusers .safetensors; SDXL's clip_l + clip_g) to the "
                   "CLIP. Prompts use it as embedding:name (as ComfyUI writes it) or <name>, negative prompts too.")
    inputs = (Input("clip", "CLIP"),
              Input("embedding", "COMBO", choices=_embeddings),
              Input("name", "STRING", default="", description="the name prompts use; empty: the file name"))
    outputs = (Output("CLIP", "CLIP"),)

    @classmethod
    def check(cls, literals: dict[str, Any], settings: Any) -> list[tuple[str | None, str]]:
        name = literals.get("name", "")
        if isinstance(name, str) and name and not _NAME.match(name):
            return [("name", f"{name[:40]!r} is not an embedding name (letters, digits, _ . -)")]
        return []

    @classmethod
    def files(cls, inputs: dict[str, Any], settings: Any) -> list[Path]:
        return [model_file(settings, "embeddings", inputs["embedding"], "embedding")]

    def run(self, ctx: Context, clip: ModelRecipe, embedding: str, name: str) -> dict[str, Any]:
        from nodes.engine import embeddings  # here: it needs torch, and the CLI must start fast

        for input_name, message in self.check({"name": name}, ctx.settings):
            raise NodeFailure(message, input_name, "invalid_value")
        path = model_file(ctx.settings, "embeddings", embedding, "embedding")
        name = name or re.sub(r"\.safetensors$", "", Path(embedding).name)
        try:
            vectors = embeddings.read(path)
        except embeddings.EmbeddingError as exc:
            raise NodeFailure(str(exc), "embedding", "bad_embedding") from None
        problem = embeddings.problem(vectors, _widths(clip.checkpoint, clip.fingerprint), path.name)
        if problem:
            raise NodeFailure(problem, "embedding", "wrong_model")
        others = tuple(e for e in clip.embeddings if e.name != name)
        return {"CLIP": replace(clip, embeddings=(*others, Embedding(name, str(path), file_fingerprint(path))))}


NODES: list[type[Node]] = [LoadEmbedding]
