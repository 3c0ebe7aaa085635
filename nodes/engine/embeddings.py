"""Textual-inversion embeddings on CLIP recipes: reading the files, and using them in prompts.

A CLIP recipe lists its embeddings (`recipe.Embedding`); a prompt names one as `embedding:name` (ComfyUI)
or `<name>`. Before encoding, each is loaded into the resident pipeline with diffusers'
`load_textual_inversion` under an internal token derived from the file's identity (`<emb-…>`), and the
prompt is rewritten to use it. A token no user types cannot change a prompt without it, so a pipeline
that has loaded embeddings still encodes every other prompt exactly as a fresh one does; tokens stay
loaded for the next run (they cost a few vectors each).

Files: safetensors only, in the A1111 layout (`emb_params`: vectors × width), the diffusers layout (one
tensor under the token's name), or SDXL's (`clip_l` and `clip_g`, one per text encoder).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch

from nodes.engine.recipe import Embedding

_COMFY = re.compile(r"embedding:([^\s,()\[\]:]+)")


class EmbeddingError(ValueError):
    """An embedding file that cannot be used with this model, or a prompt naming one the CLIP lacks."""


def read(path: Path) -> dict[str, torch.Tensor]:
    """The embedding's vectors per text encoder ("text_encoder", "text_encoder_2"), each (vectors, width)."""
    from safetensors.torch import load_file

    from nodes.engine.checkpoints import CheckpointError, require_safetensors

    try:
        require_safetensors(path)
        tensors = load_file(str(path))
    except (CheckpointError, OSError) as exc:
        raise EmbeddingError(f"{path.name}: {exc}") from None
    if "clip_l" in tensors and "clip_g" in tensors:
        found = {"text_encoder": tensors["clip_l"], "text_encoder_2": tensors["clip_g"]}
    elif "emb_params" in tensors:
        found = {"text_encoder": tensors["emb_params"]}
    elif len(tensors) == 1:
        found = {"text_encoder": next(iter(tensors.values()))}
    else:
        raise EmbeddingError(f"{path.name}: not a textual-inversion embedding (keys {', '.join(sorted(tensors))[:80]};"
                             " expected emb_params, clip_l and clip_g, or one tensor)")
    return {k: (v[None] if v.dim() == 1 else v).float() for k, v in found.items()}


def problem(vectors: dict[str, torch.Tensor], widths: dict[str, int], name: str) -> str | None:
    """Why an embedding does not fit text encoders of these widths (component -> hidden size), or None."""
    if set(vectors) != set(widths):
        kinds = "SDXL (clip_l and clip_g)" if "text_encoder_2" in vectors else "SD1.x/2.x (one text encoder)"
        return f"{name} is an embedding for {kinds}, and this model has {len(widths)} text encoder(s)"
    for component, tensor in vectors.items():
        if tensor.dim() != 2 or tensor.shape[1] != widths[component]:
            return (f"{name} has vectors of width {tensor.shape[-1]} for {component}, whose width is "
                    f"{widths[component]} (an embedding for another model?)")
    return None


def token(embedding: Embedding) -> str:
    digest = hashlib.sha256(f"{embedding.path}\0{embedding.fingerprint}".encode()).hexdigest()[:12]
    return f"<emb-{digest}>"


def ensure_loaded(pipe: Any, embeddings: tuple[Embedding, ...]) -> None:
    """Load every embedding not yet in the pipeline's tokenizers, under its internal token."""
    for embedding in embeddings:
        internal = token(embedding)
        if internal in pipe.tokenizer.get_vocab():
            continue
        for component, vectors in read(Path(embedding.path)).items():
            tokenizer = pipe.tokenizer if component == "text_encoder" else pipe.tokenizer_2
            encoder = getattr(pipe, component)
            pipe.load_textual_inversion({"emb_params": vectors.to(encoder.dtype)}, token=internal,
                                        tokenizer=tokenizer, text_encoder=encoder)


def rewrite(text: str, embeddings: tuple[Embedding, ...]) -> str:
    """The prompt with `embedding:name` and `<name>` replaced by the embeddings' internal tokens."""
    by_name = {e.name: token(e) for e in embeddings}

    def comfy(match: re.Match[str]) -> str:
        name = re.sub(r"\.(safetensors|pt|bin)$", "", match[1])
        if name not in by_name:
            raise EmbeddingError(f"the prompt names embedding {name!r}, which the CLIP does not have "
                                 f"(loaded: {', '.join(by_name) or 'none'}); add it with LoadEmbedding")
        return f" {by_name[name]} "

    text = _COMFY.sub(comfy, text)
    for name, internal in by_name.items():
        text = text.replace(f"<{name}>", f" {internal} ")
    return text
