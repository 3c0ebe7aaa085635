"""Sampling nodes: ComfyUI's KSampler and KSamplerAdvanced, and Sample, the one-node text to image.

The sampling mathematics (noise levels, schedules, samplers, classifier-free guidance) is in
`nodes.engine.sigmas` and `nodes.engine.samplers`; here the UNet is wrapped as the noise predictor they call, with
the CONDITIONING's embeddings (and SDXL's pooled embedding and size conditioning). Initial noise is
drawn on the CPU in float32 from the seed, one `randn` of the whole latent, as ComfyUI does: the same
seed gives the same image on every device. A latent with a `noise_mask` is repainted only where the
mask is 1: elsewhere the model is shown the input latent at each step's noise level and its prediction
is replaced by the input, as ComfyUI's inpainting sampler does (`nodes.engine.inpainting`).

Sample is the one-node text to image: the same pieces (prompt encoding, an empty latent, `run_sampler` and
the bounded VAE decode) in one node, so it gives the pixels of the equivalent ComfyUI graph.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace
from typing import Any

from nodegraph.context import Context, NodeFailure
from nodegraph.schema import Input, Node, Output
from nodes.controlnet import chains_of, controls_for
from nodes.engine.choices import SAMPLERS, SCHEDULERS
from nodes.engine.recipe import ModelRecipe
from nodes.engine.values import Conditioning, Latent

SEED = {"default": 0, "min": 0, "max": 2**64 - 1}
STEPS = {"default": 20, "min": 1, "max": 10000}
CFG = {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1}


def _cond(entries: Conditioning, batch: int, dtype: Any, device: str) -> dict[str, Any]:
    """The conditioning dict the UNet wrapper reads: embeddings (batch, entries, tokens, dim) and pooled ones."""
    import torch

    def stacked(tensors: list[Any]) -> Any:
        together = torch.stack(tensors)  # (entries, …)
        return together[None].expand(batch, *together.shape).to(device, dtype)

    out: dict[str, Any] = {"embeds": stacked([e.embeds[0] for e in entries.entries])}
    chains = chains_of(entries)
    if chains is not None:
        out["control"] = chains  # ControlNet hints per entry (nodes.controlnet)
    pooled = [e.pooled for e in entries.entries]
    if all(p is not None for p in pooled):
        out["pooled"] = stacked([p[0] for p in pooled if p is not None])
    return out


def run_sampler(ctx: Context, model: ModelRecipe, seed: int, steps: int, cfg: float, sampler_name: str,
                scheduler: str, positive: Conditioning, negative: Conditioning, latent: Latent, *,
                denoise: float = 1.0, add_noise: bool = True, start: int = 0, end: int = 10000,
                leftover: bool = False) -> Latent:
    import torch

    from nodes.engine.inpainting import MaskedDenoiser, blend_noise
    from nodes.engine.pipelines import materialize, retry_out_of_memory, watch_compile
    from nodes.engine.samplers import CFGDenoiser, sample
    from nodes.engine.sigmas import DiscreteModel, initial_noise, noised_latent, sigma_slice, sigmas

    if model.family in ("sd3", "flux"):
        from nodes.engine.transformer_sampling import run_flow_sampler

        return run_flow_sampler(ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                denoise=denoise, add_noise=add_noise, start=start, end=end, leftover=leftover)
    with materialize(ctx, model) as resident, ExitStack() as stack:
        unet = resident.pipe.unet
        device, dtype = resident.device, unet.dtype
        discrete = DiscreteModel.from_config(resident.scheduler_config)
        schedule = sigma_slice(sigmas(scheduler, discrete, steps, denoise=denoise, sampler=sampler_name),
                               start, end, leftover)
        if len(schedule) < 2:
            return latent  # nothing to sample (denoise 0, or start past the end)
        samples = latent.samples
        if samples.shape[1] != unet.config.in_channels:
            raise NodeFailure(f"the latent has {samples.shape[1]} channels; this model takes "
                              f"{unet.config.in_channels}", "latent_image", "wrong_latent")
        batch, _, height, width = samples.shape
        noise = initial_noise(seed, samples.shape) if add_noise else torch.zeros_like(samples)
        samples, noise = samples.to(device), noise.to(device)
        sdxl = model.family == "sdxl"
        size = torch.tensor([[height * 8, width * 8, 0, 0, height * 8, width * 8]], device=device, dtype=dtype)
        cond, uncond = _cond(positive, batch, dtype, device), _cond(negative, batch, dtype, device)
        if model.ip_adapter is not None:  # diffusers' pipeline: the negative side's are zeros or a blank image's
            from nodes.engine.ip_adapter import embeddings

            image, blank = (e[None].expand(batch, *e.shape).to(device, dtype) for e in embeddings(model.ip_adapter))
            cond["image_embeds"], uncond["image_embeds"] = image, blank
        if sdxl and ("pooled" not in cond or "pooled" not in uncond):
            raise NodeFailure("SDXL needs conditioning from its own CLIP (with pooled embeddings)", "positive",
                              "wrong_conditioning")

        controls = stack.enter_context(controls_for(ctx, (positive, negative), unet, discrete, samples.shape, device))

        def eps(x: Any, timestep: Any, c: dict[str, Any]) -> Any:
            embeds = c["embeds"]  # (batch, entries, tokens, dim): one prediction per entry, averaged
            rows, entries = embeds.shape[:2]
            extra: dict[str, Any] = {}
            if sdxl:
                extra["added_cond_kwargs"] = {"text_embeds": c["pooled"].flatten(0, 1),
                                              "time_ids": size.expand(rows * entries, -1)}
            if "image_embeds" in c:  # IP-Adapter (nodes/engine/ip_adapter.py): one list entry per adapter
                extra.setdefault("added_cond_kwargs", {})["image_embeds"] = [
                    c["image_embeds"].repeat_interleave(entries, 0)]
            x, timestep = x.to(dtype).repeat_interleave(entries, 0), timestep.repeat_interleave(entries, 0)
            embeds = embeds.flatten(0, 1)
            if controls is not None and "control" in c:
                extra.update(controls.residuals(x, timestep, embeds, extra.get("added_cond_kwargs"), c["control"]))
            out = unet(x, timestep, encoder_hidden_states=embeds, **extra).sample.float()
            return out.unflatten(0, (rows, entries)).mean(1)

        mask = latent.noise_mask
        if mask is not None:
            mask = torch.nn.functional.interpolate(mask.to(device), size=(height, width), mode="bilinear")
        cfg_denoiser = CFGDenoiser(discrete, eps, cond, uncond, cfg)
        guided: Any = cfg_denoiser if mask is None else \
            MaskedDenoiser(cfg_denoiser, mask, samples, blend_noise(sampler_name, noise, seed))

        def denoiser(x: Any, sigma: Any) -> Any:
            if controls is not None:
                controls.sigma = float(sigma)  # which ControlNets are active (their start/end percent)
            return guided(x, sigma)

        def on_step(i: int, total: int, x: Any, denoised: Any) -> None:
            if model.schedules:
                resident.set_step(i + 1)
            ctx.progress(i + 1, total)

        def run() -> Any:
            if model.schedules:
                resident.set_step(0)
            x = noised_latent(discrete, samples, noise, schedule)
            with torch.inference_mode(), watch_compile(ctx, resident):
                return sample(sampler_name, denoiser, x, schedule, seed=seed, callback=on_step,
                              cancel_check=ctx.check_cancelled)

        out = retry_out_of_memory(ctx, run, f"sampling {batch}× {width * 8}×{height * 8}")
    return Latent(out, latent.noise_mask)


class KSampler(Node):
    type = "KSampler"
    version = "1.0.0"
    category = "sampling"
    description = ("Denoises a latent with the MODEL, guided by positive and negative conditioning (ComfyUI's "
                   "samplers and schedulers). denoise < 1 keeps part of the input latent: image to image.")
    inputs = (Input("model", "MODEL"), Input("seed", "INT", **SEED), Input("steps", "INT", **STEPS),
              Input("cfg", "FLOAT", **CFG), Input("sampler_name", "COMBO", default="euler", choices=SAMPLERS),
              Input("scheduler", "COMBO", default="normal", choices=SCHEDULERS),
              Input("positive", "CONDITIONING"), Input("negative", "CONDITIONING"),
              Input("latent_image", "LATENT"), Input("denoise", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01))
    outputs = (Output("LATENT", "LATENT"),)

    def run(self, ctx: Context, model: ModelRecipe, seed: int, steps: int, cfg: float, sampler_name: str,
            scheduler: str, positive: Conditioning, negative: Conditioning, latent_image: Latent,
            denoise: float) -> dict[str, Any]:
        return {"LATENT": run_sampler(ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                      latent_image, denoise=denoise)}


class KSamplerAdvanced(Node):
    type = "KSamplerAdvanced"
    version = "1.0.0"
    category = "sampling"
    description = ("KSampler over a range of the schedule's steps: two in a row (the first returning its leftover "
                   "noise, the second adding none) equal one full run.")
    inputs = (Input("model", "MODEL"), Input("add_noise", "COMBO", default="enable", choices=("enable", "disable")),
              Input("noise_seed", "INT", **SEED), Input("steps", "INT", **STEPS), Input("cfg", "FLOAT", **CFG),
              Input("sampler_name", "COMBO", default="euler", choices=SAMPLERS),
              Input("scheduler", "COMBO", default="normal", choices=SCHEDULERS),
              Input("positive", "CONDITIONING"), Input("negative", "CONDITIONING"),
              Input("latent_image", "LATENT"),
              Input("start_at_step", "INT", default=0, min=0, max=10000),
              Input("end_at_step", "INT", default=10000, min=0, max=10000),
              Input("return_with_leftover_noise", "COMBO", default="disable", choices=("disable", "enable")))
    outputs = (Output("LATENT", "LATENT"),)

    def run(self, ctx: Context, model: ModelRecipe, add_noise: str, noise_seed: int, steps: int, cfg: float,
            sampler_name: str, scheduler: str, positive: Conditioning, negative: Conditioning,
            latent_image: Latent, start_at_step: int, end_at_step: int,
            return_with_leftover_noise: str) -> dict[str, Any]:
        return {"LATENT": run_sampler(ctx, model, noise_seed, steps, cfg, sampler_name, scheduler, positive,
                                      negative, latent_image, add_noise=add_noise == "enable", start=start_at_step,
                                      end=end_at_step, leftover=return_with_leftover_noise == "enable")}


class Sample(Node):
    type = "Sample"
    version = "2.0.0"
    category = "sampling"
    description = (
        "Text to image in one node: CLIPTextEncode ×2, EmptyLatentImage, KSampler and VAEDecode on the MODEL's "
        "checkpoint (its LoRAs on the text encoders too), with the same pixels as that graph. Flux: `guidance` is "
        "FluxGuidance's (KSampler at cfg 1, no negative prompt); SD3 and Flux start from 16-channel latents."
    )
    inputs = (
        Input("model", "MODEL"),
        Input("prompt", "STRING", default="", multiline=True),
        Input("negative_prompt", "STRING", default="", multiline=True),
        Input("seed", "INT", **SEED),
        Input("steps", "INT", default=20, min=1, max=1000),
        Input("guidance", "FLOAT", default=7.0, min=0.0, max=100.0, step=0.1),
        Input("width", "INT", default=512, min=8, max=8192, step=8),
        Input("height", "INT", default=512, min=8, max=8192, step=8),
        Input("sampler_name", "COMBO", default="euler", choices=SAMPLERS),
        Input("scheduler", "COMBO", default="normal", choices=SCHEDULERS),
        Input("batch_size", "INT", default=1, min=1, max=64),
    )
    outputs = (Output("images", "IMAGE"),)

    @classmethod
    def check(cls, literals: dict[str, Any], settings: Any) -> list[tuple[str | None, str]]:
        return [
            (name, f"{literals[name]} is not a multiple of 8")
            for name in ("width", "height")
            if name in literals and literals[name] % 8
        ]

    @classmethod
    def check_resources(cls, literals: dict[str, Any], models: Any) -> list[tuple[str | None, str]]:
        """Refuse a size that cannot fit the device's memory whatever the model (its family and dtype
        are known only at run time, so the smallest factor and 2-byte elements are assumed here)."""
        from nodes.engine.memory import activation_bytes, room_for_activations, too_large

        if not all(name in literals for name in ("width", "height", "batch_size")):
            return []
        width, height, batch = literals["width"], literals["height"], literals["batch_size"]
        need = activation_bytes(None, width, height, batch, literals.get("guidance", 0) > 1, 2)
        problem = too_large(need, room_for_activations(models, 0), width, height, batch, models)
        return [problem] if problem else []

    def run(self, ctx: Context, model: ModelRecipe, prompt: str, negative_prompt: str, seed: int, steps: int,
            guidance: float, width: int, height: int, sampler_name: str, scheduler: str,
            batch_size: int) -> dict[str, Any]:
        import torch

        from nodes.conditioning import encode_text
        from nodes.latent import decode

        for name, problem in self.check({"width": width, "height": height}, ctx.settings):
            raise NodeFailure(problem, name, "invalid_value")
        check_activations(ctx, model, width, height, batch_size, guidance)
        clip, vae = model.clip(), replace(model.bare(), part="vae")
        flux = model.family == "flux"
        if flux and negative_prompt:
            raise NodeFailure("Flux takes no negative prompt (its guidance is embedded in the model); leave it empty",
                              "negative_prompt", "invalid_value")
        try:
            positive = encode_text(ctx, prompt, clip)
            negative = positive if flux else encode_text(ctx, negative_prompt, clip)  # Flux: never used at cfg 1
        except NodeFailure as exc:  # Sample's text encoders are its model's
            raise NodeFailure(str(exc), "model" if exc.input == "clip" else exc.input, exc.code) from None
        cfg = guidance
        if flux:  # FluxGuidance, then KSampler at cfg 1: Flux dev's guidance is an input of the model
            positive, cfg = Conditioning(tuple(e.with_extras(guidance=guidance) for e in positive.entries)), 1.0
        channels = 16 if model.family in ("sd3", "flux") else 4  # EmptySD3LatentImage or EmptyLatentImage
        empty = Latent(torch.zeros(batch_size, channels, height // 8, width // 8))
        latent = run_sampler(ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, empty)
        params = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
                  "guidance": guidance, "width": width, "height": height, "sampler_name": sampler_name,
                  "scheduler": scheduler, "model": model.summary()}
        return {"images": decode(ctx, latent, vae, params)}


def check_activations(ctx: Context, model: ModelRecipe, width: int, height: int, batch: int,
                      guidance: float) -> None:
    """Refuse, before loading anything, a Sample whose activations cannot fit the device's memory."""
    import torch

    from nodes.engine.checkpoints import CheckpointError
    from nodes.engine.memory import activation_bytes, room_for_activations, too_large
    from nodes.engine.pipelines import estimate_bytes, resolve_dtype

    dtype = resolve_dtype(model.dtype, ctx.models.device)
    element_size = torch.empty((), dtype=dtype).element_size()
    need = activation_bytes(model.family, width, height, batch, guidance > 1, element_size)
    try:
        weights = estimate_bytes(model.checkpoint, dtype)
    except CheckpointError:  # reported with its own message when it loads
        weights = 0
    problem = too_large(need, room_for_activations(ctx.models, weights), width, height, batch, ctx.models, weights)
    if problem:
        raise NodeFailure(problem[1], problem[0], "too_large")



NODES: list[type[Node]] = [Sample, KSampler, KSamplerAdvanced]
