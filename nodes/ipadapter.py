"""IP-Adapter nodes: IPAdapterModelLoader and CLIPVisionLoader (file references) and IPAdapterApply (an image
prompt on a MODEL), named as ComfyUI and its IPAdapter pack name them.

IPAdapterApply checks the adapter against the model's UNet (from its config, on the meta device) and against
the encoder, encodes the image with the CLIP vision model (from the model manager) and returns a MODEL recipe
recording the adapter, weight and embeddings; the reconciler loads the adapter when a sampler needs the model
(nodes/engine/ip_adapter.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodegraph.cache import file_fingerprint
from nodegraph.context import Context, NodeFailure
from nodegraph.schema import Input, Node, Output
from nodegraph.settings import ModelChoices
from nodes.engine.recipe import IPAdapter, ModelRecipe
from nodes.model_files import model_file

if TYPE_CHECKING:
    from nodes.engine.clip_vision import VisionRef

_adapters = ModelChoices("ipadapter")
_vision = ModelChoices("clip_vision")


@dataclass(frozen=True)
class FileRef:
    """An IPADAPTER value: a model file, by path and fingerprint; it loads when used."""

    path: str
    fingerprint: str


class IPAdapterModelLoader(Node):
    type = "IPAdapterModelLoader"
    version = "1.0.0"
    category = "loaders"
    description = ("An IP-Adapter from the models folder's ipadapter/ (.safetensors, diffusers' single-file layout: "
                   "image_proj.* and ip_adapter.N.to_k_ip/to_v_ip). For IPAdapterApply.")
    inputs = (Input("ipadapter_file", "COMBO", choices=_adapters),)
    outputs = (Output("IPADAPTER", "IPADAPTER"),)

    @classmethod
    def files(cls, inputs: dict[str, Any], settings: Any) -> list[Path]:
        return [model_file(settings, "ipadapter", inputs["ipadapter_file"], "ipadapter_file")]

    def run(self, ctx: Context, ipadapter_file: str) -> dict[str, Any]:
        from nodes.engine import ip_adapter

        path = model_file(ctx.settings, "ipadapter", ipadapter_file, "ipadapter_file")
        try:
            ip_adapter.read_adapter(path)
        except ip_adapter.IPAdapterError as exc:
            raise NodeFailure(str(exc), "ipadapter_file", "bad_ipadapter") from None
        return {"IPADAPTER": FileRef(str(path), file_fingerprint(path))}


class CLIPVisionLoader(Node):
    type = "CLIPVisionLoader"
    version = "1.1.0"
    category = "loaders"
    description = ("A CLIP vision image encoder from clip_vision/: a .safetensors of CLIPVisionModelWithProjection "
                   "weights as ComfyUI users have them (transformers' keys, also under a prefix, or OpenCLIP's); its "
                   "config from the metadata, a config.json beside it, or the tensor shapes. For IPAdapterApply; "
                   "it loads when used, through the model manager.")
    inputs = (Input("clip_name", "COMBO", choices=_vision),)
    outputs = (Output("CLIP_VISION", "CLIP_VISION"),)

    @classmethod
    def files(cls, inputs: dict[str, Any], settings: Any) -> list[Path]:
        return [model_file(settings, "clip_vision", inputs["clip_name"], "clip_name")]

    def run(self, ctx: Context, clip_name: str) -> dict[str, Any]:
        from nodes.engine import clip_vision

        path = model_file(ctx.settings, "clip_vision", clip_name, "clip_name")
        try:
            return {"CLIP_VISION": clip_vision.read_vision_file(path, file_fingerprint(path))}
        except clip_vision.ClipVisionError as exc:
            raise NodeFailure(str(exc), "clip_name", "bad_clip_vision") from None


class IPAdapterApply(Node):
    type = "IPAdapterApply"
    version = "1.1.0"
    category = "model"
    description = ("An image prompt: the MODEL with the IP-Adapter in its UNet at `weight`, shown the IMAGE's CLIP "
                   "vision embeddings (IP-Adapter, Plus or Full; a batch of images: their tokens concatenated, as "
                   "diffusers does with several images for one adapter). SD1.x/SDXL; diffusers' load_ip_adapter.")
    inputs = (Input("model", "MODEL"), Input("ipadapter", "IPADAPTER"), Input("clip_vision", "CLIP_VISION"),
              Input("image", "IMAGE"), Input("weight", "FLOAT", default=1.0, min=-1.0, max=5.0, step=0.05))
    outputs = (Output("MODEL", "MODEL"),)

    def run(self, ctx: Context, model: ModelRecipe, ipadapter: FileRef, clip_vision: VisionRef, image: Any,
            weight: float) -> dict[str, Any]:
        from nodes.engine import clip_vision as vision
        from nodes.engine import ip_adapter, lora_match

        if model.family not in ("sd15", "sd2", "sdxl"):
            raise NodeFailure(f"IP-Adapter works on SD1.x/2.x and SDXL UNets, not {model.family}", "model",
                              "wrong_model")
        name = Path(ipadapter.path).name
        try:
            state = ip_adapter.read_adapter(Path(ipadapter.path))
        except ip_adapter.IPAdapterError as exc:
            raise NodeFailure(str(exc), "ipadapter", "bad_ipadapter") from None
        modules = lora_match.model_layers(model.checkpoint, model.fingerprint).modules["unet"]
        problem = ip_adapter.problem(state, modules, name)
        if problem:
            raise NodeFailure(problem, "ipadapter", "wrong_model")
        problem = ip_adapter.input_problem(state, clip_vision.config, name, clip_vision.name)
        if problem:
            raise NodeFailure(problem, "clip_vision", "wrong_model")
        import torch

        pixels = torch.from_numpy(image.pixels.copy()).float() / 255
        with vision.resident_clip_vision(ctx, clip_vision, model.dtype) as encoder:
            embeds, negative = vision.encode(encoder.model, pixels, ip_adapter.kind(state, name) == "hidden")
        use = IPAdapter(ipadapter.path, ipadapter.fingerprint, float(weight),
                        **ip_adapter.to_recipe(embeds, negative))
        return {"MODEL": replace(model, ip_adapter=use)}


NODES: list[type[Node]] = [IPAdapterModelLoader, CLIPVisionLoader, IPAdapterApply]
