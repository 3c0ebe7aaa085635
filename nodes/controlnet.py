"""ComfyUI's ControlNet nodes: ControlNetLoader and ControlNetApplyAdvanced, and the residuals KSampler adds.

ControlNetApplyAdvanced attaches a hint (image, strength, start/end percent) to every entry of the positive
and negative conditioning, after any hints already there: a chain, whose residuals add up. At each model call
the sampler asks `Controls.residuals` for the down and mid residuals of the hints active at the current noise
level: each ControlNet runs on the UNet's own input, timestep, text embeddings (and SDXL's added conditioning),
with the hint resized to the latent's pixel size; its residuals are scaled by the strength and passed to the
UNet (`down_block_additional_residuals`, `mid_block_additional_residual`), as diffusers' pipelines do. As in
ComfyUI, percents map to noise levels through the model's sigma(timestep): a hint is active while
sigma(start) ≥ σ ≥ sigma(end), with 0 % meaning "from the start" and 100 % "to the end"; strength 0 attaches
nothing, so it equals no ControlNet exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodegraph.cache import file_fingerprint
from nodegraph.context import Context, NodeFailure
from nodegraph.schema import Input, Node, Output
from nodegraph.settings import ModelChoices, Settings
from nodes.engine.controlnet_model import CONFIG, ControlNetFileError, ControlNetRef, mismatch, read_config
from nodes.engine.images import ImageBatch
from nodes.engine.values import Conditioning

KIND = "controlnet"  # the models folder's subfolder, as ComfyUI's


def controlnet_names(settings: Settings) -> list[str]:
    """ControlNets in the models folders: `.safetensors` files, and diffusers folders (with a config.json)."""
    return settings.model_files(KIND, folders=CONFIG)


def _resolve(settings: Settings, name: str) -> Path:
    try:
        return settings.resolve_model(KIND, name)
    except FileNotFoundError as exc:  # ModelNameError (a name no file can have) too: its code is bad_name
        raise NodeFailure(str(exc), "control_net_name", getattr(exc, "code", "file_not_found")) from None


class ControlNetLoader(Node):
    type = "ControlNetLoader"
    version = "1.0.0"
    category = "loaders"
    description = ("A ControlNet from the models folder's controlnet/ (a diffusers folder, or one .safetensors file "
                   "in diffusers' layout). A reference only: the weights load when a sampler needs them.")
    inputs = (Input("control_net_name", "COMBO", choices=ModelChoices(KIND, listing=controlnet_names)),)
    outputs = (Output("CONTROL_NET", "CONTROL_NET"),)

    @classmethod
    def check(cls, literals: dict[str, Any], settings: Any) -> list[tuple[str | None, str]]:
        if settings is None:
            return []
        try:
            read_config(settings.resolve_model(KIND, literals["control_net_name"]))
        except (FileNotFoundError, ControlNetFileError) as exc:
            return [("control_net_name", str(exc))]
        return []

    @classmethod
    def files(cls, inputs: dict[str, Any], settings: Any) -> list[Path]:
        return [_resolve(settings, inputs["control_net_name"])]

    def run(self, ctx: Context, control_net_name: str) -> dict[str, Any]:
        import json

        path = _resolve(ctx.settings, control_net_name)
        try:
            config = read_config(path)
        except ControlNetFileError as exc:
            raise NodeFailure(str(exc), "control_net_name", "bad_controlnet") from None
        return {"CONTROL_NET": ControlNetRef(str(path), file_fingerprint(path), json.dumps(config, sort_keys=True))}


@dataclass(frozen=True, eq=False)
class ControlHint:
    """One ControlNet attached to a conditioning entry: its hint image (batch, 3, H, W) in 0..1 and its range."""

    net: ControlNetRef
    image: Any  # torch.Tensor, float32 on the CPU
    strength: float
    start_percent: float
    end_percent: float

    @property
    def nbytes(self) -> int:
        return int(self.image.numel()) * 4


class ControlNetApplyAdvanced(Node):
    type = "ControlNetApplyAdvanced"
    version = "1.0.0"
    category = "conditioning"
    description = ("Steers sampling with a ControlNet and a hint image (edges, depth, pose, …) on both the positive "
                   "and the negative conditioning, between start_percent and end_percent of the sampling. Chain "
                   "several: their residuals add.")
    inputs = (Input("positive", "CONDITIONING"), Input("negative", "CONDITIONING"),
              Input("control_net", "CONTROL_NET"), Input("image", "IMAGE"),
              Input("strength", "FLOAT", default=1.0, min=0.0, max=10.0, step=0.01),
              Input("start_percent", "FLOAT", default=0.0, min=0.0, max=1.0, step=0.001),
              Input("end_percent", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.001),
              Input("vae", "VAE", optional=True,
                    description="for ControlNets that take latent hints; SD1.x/SDXL ControlNets do not use it"))
    outputs = (Output("positive", "CONDITIONING"), Output("negative", "CONDITIONING"))

    def run(self, ctx: Context, positive: Conditioning, negative: Conditioning, control_net: ControlNetRef,
            image: ImageBatch, strength: float, start_percent: float, end_percent: float,
            vae: Any = None) -> dict[str, Any]:
        import torch

        if strength == 0:  # as ComfyUI: nothing attached, so exactly the same as no ControlNet
            return {"positive": positive, "negative": negative}
        for name, conditioning in (("positive", positive), ("negative", negative)):
            for entry in conditioning.entries:
                if entry.embeds.shape[-1] != control_net.config["cross_attention_dim"] or (
                        entry.pooled is not None) != control_net.pooled:
                    raise NodeFailure(
                        f"{control_net.name} is a ControlNet for another architecture: it takes "
                        f"{control_net.describe()}; the {name} conditioning has {entry.embeds.shape[-1]}-dim "
                        f"embeddings {'with' if entry.pooled is not None else 'without'} pooled ones",
                        "control_net", "wrong_controlnet")
        pixels = torch.from_numpy(image.pixels.copy()).permute(0, 3, 1, 2).float() / 255
        chains: dict[tuple[ControlHint, ...], tuple[ControlHint, ...]] = {}

        def attach(conditioning: Conditioning) -> Conditioning:
            entries = []
            for entry in conditioning.entries:
                before = tuple(entry.extras.get("control", ()))
                if before not in chains:  # positive and negative share one hint, so CFG batches them together
                    chains[before] = (*before, ControlHint(control_net, pixels, strength, start_percent,
                                                           end_percent))
                entries.append(entry.with_extras(control=chains[before]))
            return Conditioning(tuple(entries))

        return {"positive": attach(positive), "negative": attach(negative)}


def percent_to_sigma(discrete: Any, percent: float) -> float:
    """ComfyUI's mapping of a sampling percentage to a noise level: 0 is above any sigma, 1 is 0."""
    import torch

    if percent <= 0.0:
        return float("inf")
    if percent >= 1.0:
        return 0.0
    return float(discrete.sigma(torch.tensor((1.0 - percent) * 999.0)))


class Controls:
    """The ControlNets of one sampling run: live models, hints resized once, the current noise level."""

    def __init__(self, models: dict[ControlNetRef, Any], discrete: Any, pixel_size: tuple[int, int], batch: int,
                 device: str, dtype: Any) -> None:
        self.models, self.discrete, self.size, self.batch = models, discrete, pixel_size, batch
        self.device, self.dtype = device, dtype
        self.sigma = float("inf")  # set by the sampler before each model call
        self._images: dict[int, Any] = {}
        self._ranges: dict[int, tuple[float, float]] = {}

    def active(self, hint: ControlHint) -> bool:
        if id(hint) not in self._ranges:
            self._ranges[id(hint)] = (percent_to_sigma(self.discrete, hint.start_percent),
                                      percent_to_sigma(self.discrete, hint.end_percent))
        high, low = self._ranges[id(hint)]
        return low <= self.sigma <= high

    def image(self, hint: ControlHint) -> Any:
        """The hint at the latent's pixel size (centre-cropped to its aspect, nearest-exact), one per sample."""
        import torch

        if id(hint) not in self._images:
            image, (height, width) = hint.image, self.size
            h, w = image.shape[-2:]
            if h * width != w * height:  # crop the longer side to the target's aspect, as ComfyUI does
                keep_h, keep_w = min(h, round(w * height / width)), min(w, round(h * width / height))
                top, left = (h - keep_h) // 2, (w - keep_w) // 2
                image = image[..., top:top + keep_h, left:left + keep_w]
            image = torch.nn.functional.interpolate(image, size=(height, width), mode="nearest-exact")
            index = torch.arange(self.batch) % image.shape[0]  # a shorter batch of hints repeats
            self._images[id(hint)] = image[index].to(self.device, self.dtype)
        return self._images[id(hint)]

    def residuals(self, x: Any, timestep: Any, embeds: Any, added: dict[str, Any] | None,
                  chains: tuple[tuple[ControlHint, ...], ...]) -> dict[str, Any]:
        """UNet keyword arguments with the summed residuals of the active hints; {} when none is active.

        x, timestep and embeds are the UNet's flattened rows: sample-major, then one row per conditioning entry
        (`chains[e]` is entry e's chain); a row's sample is row // entries modulo the latent batch.
        """
        import torch

        entries = len(chains)
        sums: list[list[Any] | None] = [None] * entries
        for e, chain in enumerate(chains):
            rows = slice(e, None, entries)
            for hint in chain:
                if not self.active(hint):
                    continue
                samples = torch.arange(x.shape[0] // entries, device=x.device) % self.batch
                extra = {} if added is None else {"added_cond_kwargs": {k: v[rows] for k, v in added.items()}}
                down, mid = self.models[hint.net](
                    x[rows], timestep[rows], encoder_hidden_states=embeds[rows],
                    controlnet_cond=self.image(hint)[samples], conditioning_scale=hint.strength, return_dict=False,
                    **extra)
                outs = [*down, mid]
                sums[e] = outs if sums[e] is None else [a + b for a, b in zip(sums[e], outs, strict=True)]
        present = [s for s in sums if s is not None]
        if not present:
            return {}
        if entries == 1:
            total = present[0]
        else:  # entries without an active hint add zeros
            total = [torch.zeros((x.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device) for t in present[0]]
            for e, outs in enumerate(sums):
                for whole, part in zip(total, outs or (), strict=False):
                    whole[e::entries] = part
        return {"down_block_additional_residuals": tuple(total[:-1]), "mid_block_additional_residual": total[-1]}


def chains_of(conditioning: Conditioning) -> tuple[tuple[ControlHint, ...], ...] | None:
    """Each entry's ControlNet chain, for the sampler's conditioning dict; None when no entry has one."""
    chains = tuple(tuple(e.extras.get("control", ())) for e in conditioning.entries)
    return chains if any(chains) else None


@contextmanager
def controls_for(ctx: Context, conditionings: tuple[Conditioning, ...], unet: Any, discrete: Any,
                 latent_shape: tuple[int, ...], device: str) -> Iterator[Controls | None]:
    """The ControlNets the conditionings carry, checked against the UNet and loaded; None if there are none."""
    from nodes.engine.controlnet_model import resident_controlnets

    refs: list[ControlNetRef] = []
    for conditioning in conditionings:
        for chain in chains_of(conditioning) or ():
            refs.extend(h.net for h in chain if h.net not in refs)
    if not refs:
        yield None
        return
    for ref in refs:
        problem = mismatch(ref, unet.config)
        if problem:
            raise NodeFailure(f"{ref.name} is a ControlNet for another architecture: {problem}", "positive",
                              "wrong_controlnet")
    batch, _, height, width = latent_shape
    with resident_controlnets(ctx, refs, unet.dtype) as models:
        yield Controls(models, discrete, (height * 8, width * 8), batch, device, unet.dtype)


NODES: list[type[Node]] = [ControlNetLoader, ControlNetApplyAdvanced]
