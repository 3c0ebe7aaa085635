"""ComfyUI's conditioning nodes: CLIPTextEncode, CLIPSetLastLayer, ConditioningCombine, ConditioningZeroOut,
FluxGuidance.

A prompt is encoded once by the text encoders of the CLIP recipe (its LoRAs reconciled on the text
encoders only) and cached like any value: changing the negative prompt re-runs only its encoder.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from nodegraph.context import Context, NodeFailure
from nodegraph.schema import Input, Node, Output
from nodes.engine.recipe import ModelRecipe
from nodes.engine.values import CondEntry, Conditioning


class CLIPTextEncode(Node):
    type = "CLIPTextEncode"
    version = "1.0.0"
    category = "conditioning"
    description = ("Encodes a prompt with the CLIP's text encoders (SDXL: both, plus the pooled embedding; SD3 and "
                   "Flux: CLIP and T5, as their pipelines do).")
    inputs = (Input("text", "STRING", default="", multiline=True), Input("clip", "CLIP"))
    outputs = (Output("CONDITIONING", "CONDITIONING"),)

    def run(self, ctx: Context, text: str, clip: ModelRecipe) -> dict[str, Any]:
        return {"CONDITIONING": encode_text(ctx, text, clip)}


def encode_text(ctx: Context, text: str, clip: ModelRecipe) -> Conditioning:
    """A prompt's conditioning from the text encoders of the CLIP recipe (SDXL: both, plus the pooled one;
    SD3 and Flux: see `_encode_transformer_family`)."""
    import torch

    from nodes.engine import embeddings
    from nodes.engine.pipelines import materialize

    if clip.family in ("sd3", "flux"):
        return Conditioning((_encode_transformer_family(ctx, clip, text),))
    with materialize(ctx, clip) as resident:
        pipe, device = resident.pipe, resident.text_encoder_device or resident.device
        if clip.embeddings or "embedding:" in text:
            try:
                embeddings.ensure_loaded(pipe, clip.embeddings)
                text = embeddings.rewrite(text, clip.embeddings)
            except embeddings.EmbeddingError as exc:
                raise NodeFailure(str(exc), "text", "unknown_embedding") from None
        layers = pipe.text_encoder.config.num_hidden_layers
        if clip.clip_skip >= layers:
            raise NodeFailure(f"stop_at_clip_layer {-1 - clip.clip_skip} is past the text encoder's {layers} "
                              "layers", "clip", "invalid_value")
        skip = clip.clip_skip or None
        with torch.inference_mode():
            if clip.family == "sdxl":
                embeds, _, pooled, _ = pipe.encode_prompt(text, device=device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False, clip_skip=skip)
            else:
                embeds, pooled = _encode(pipe, text, device, clip.clip_skip), None
    return Conditioning((CondEntry(embeds, pooled),))


def _encode_transformer_family(ctx: Context, clip: ModelRecipe, text: str) -> CondEntry:
    """SD3: CLIP-L and CLIP-G hidden states beside T5's, and both pooled; Flux: T5's states and CLIP-L pooled.
    The pipeline's own `encode_prompt`, so the embeddings are exactly what its Sample uses."""
    import torch

    from nodes.engine.pipelines import materialize

    if clip.clip_skip:
        raise NodeFailure("stop_at_clip_layer is for SD1.x/2.x and SDXL; leave it at -1 here", "clip", "invalid_value")
    with materialize(ctx, clip) as resident, torch.inference_mode():
        pipe, device = resident.pipe, resident.text_encoder_device or resident.device
        if pipe.text_encoder is None:
            raise NodeFailure(f"{clip.checkpoint.rsplit('/', 1)[-1]} has no text encoders (a transformer-only file)",
                              "clip", "wrong_model")
        if clip.family == "flux":
            embeds, pooled, _ = pipe.encode_prompt(text, prompt_2=None, device=device,
                                                   num_images_per_prompt=1)
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(text, prompt_2=None, prompt_3=None, device=device,
                                                      num_images_per_prompt=1, do_classifier_free_guidance=False)
    return CondEntry(embeds, pooled)


def _encode(pipe: Any, text: str, device: str, skip: int) -> Any:
    """SD1.x/2.x prompt embeddings, `skip` layers before the last, through the final layer norm.

    diffusers 0.42's `encode_prompt(clip_skip=…)` reads `text_encoder.text_model`, a level transformers 5's
    CLIP models no longer have; this is the same computation on either layout.
    """
    text = pipe.maybe_convert_prompt(text, pipe.tokenizer)  # an embedding's token -> one token per vector
    ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)
    encoder = pipe.text_encoder
    if not skip:
        return encoder(ids)[0]
    hidden = encoder(ids, output_hidden_states=True).hidden_states[-(skip + 1)]
    return getattr(encoder, "text_model", encoder).final_layer_norm(hidden)


class CLIPSetLastLayer(Node):
    type = "CLIPSetLastLayer"
    version = "1.0.0"
    category = "conditioning"
    description = "Which text-encoder layer prompts are read from: -1 the last, -2 the one before (\"clip skip 2\")."
    inputs = (Input("clip", "CLIP"), Input("stop_at_clip_layer", "INT", default=-1, min=-24, max=-1, step=1))
    outputs = (Output("CLIP", "CLIP"),)

    def run(self, ctx: Context, clip: ModelRecipe, stop_at_clip_layer: int) -> dict[str, Any]:
        return {"CLIP": replace(clip, clip_skip=-1 - stop_at_clip_layer)}


class ConditioningCombine(Node):
    type = "ConditioningCombine"
    version = "1.0.0"
    category = "conditioning"
    description = "Both conditionings at once: the sampler predicts with each and averages, as ComfyUI does."
    inputs = (Input("conditioning_1", "CONDITIONING"), Input("conditioning_2", "CONDITIONING"))
    outputs = (Output("CONDITIONING", "CONDITIONING"),)

    def run(self, ctx: Context, conditioning_1: Conditioning, conditioning_2: Conditioning) -> dict[str, Any]:
        return {"CONDITIONING": Conditioning(conditioning_1.entries + conditioning_2.entries)}


class ConditioningZeroOut(Node):
    type = "ConditioningZeroOut"
    version = "1.0.0"
    category = "conditioning"
    description = "The same conditioning with every embedding (and pooled embedding) set to zero."
    inputs = (Input("conditioning", "CONDITIONING"),)
    outputs = (Output("CONDITIONING", "CONDITIONING"),)

    def run(self, ctx: Context, conditioning: Conditioning) -> dict[str, Any]:
        return {"CONDITIONING": Conditioning(tuple(
            replace(e, embeds=e.embeds * 0, pooled=None if e.pooled is None else e.pooled * 0)
            for e in conditioning.entries))}


class FluxGuidance(Node):
    type = "FluxGuidance"
    version = "1.0.0"
    category = "conditioning"
    description = ("Flux dev's guidance, embedded in the model rather than CFG (run KSampler at cfg 1): set on every "
                   "entry of the conditioning. Without it, 3.5.")
    inputs = (Input("conditioning", "CONDITIONING"),
              Input("guidance", "FLOAT", default=3.5, min=0.0, max=100.0, step=0.1))
    outputs = (Output("CONDITIONING", "CONDITIONING"),)

    def run(self, ctx: Context, conditioning: Conditioning, guidance: float) -> dict[str, Any]:
        return {"CONDITIONING": Conditioning(tuple(e.with_extras(guidance=guidance) for e in conditioning.entries))}


NODES: list[type[Node]] = [CLIPTextEncode, CLIPSetLastLayer, ConditioningCombine, ConditioningZeroOut, FluxGuidance]
