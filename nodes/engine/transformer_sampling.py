"""Sampling for the transformer families (SD3, Flux): KSampler's (and so Sample's) flow-matching sampling on the
transformer (`run_flow_sampler`, with `nodes.engine.flow`), as ComfyUI samples these models.

Flux.1-dev is guidance-distilled: FluxGuidance's value goes into the transformer's guidance embedding (run at
cfg 1: one pass per step, no negative prompt); schnell has no embedding and ignores it. SD3 uses classifier-free
guidance with a negative prompt. The shift is the model's (ModelSamplingFlux/ModelSamplingSD3 set it).

The starting noise is the same CPU draw as everywhere (`sigmas.initial_noise`: one float32 `randn` of the
(batch, channels, height/8, width/8) latent from the seed), packed into Flux's 2×2 patches where needed.
"""

from __future__ import annotations

from typing import Any

from nodegraph.context import Context, NodeFailure
from nodes.engine.recipe import ModelRecipe
from nodes.engine.values import Conditioning, Latent

#: Flux's guidance when no FluxGuidance node sets one (ComfyUI's default).
DEFAULT_FLUX_GUIDANCE = 3.5


def run_flow_sampler(ctx: Context, model: ModelRecipe, seed: int, steps: int, cfg: float, sampler_name: str,
                     scheduler: str, positive: Conditioning, negative: Conditioning, latent: Latent, *,
                     denoise: float = 1.0, add_noise: bool = True, start: int = 0, end: int = 10000,
                     leftover: bool = False) -> Latent:
    """KSampler / KSamplerAdvanced for SD3 and Flux: ComfyUI's flow-matching sampling (see `nodes.engine.flow`)."""
    import torch

    from nodes.engine.flow import FLOW_SAMPLERS, FlowDenoiser, FlowModel, flow_noised, transformer_velocity
    from nodes.engine.pipelines import materialize, retry_out_of_memory, watch_compile
    from nodes.engine.samplers import sample
    from nodes.engine.sigmas import initial_noise, sigma_slice, sigmas

    if sampler_name not in FLOW_SAMPLERS:
        raise NodeFailure(f"{model.family} is a flow-matching model; sampler_name must be one of "
                          f"{', '.join(FLOW_SAMPLERS)}, not {sampler_name!r}", "sampler_name", "invalid_value")
    if latent.noise_mask is not None:
        raise NodeFailure(f"inpainting with a noise mask is not supported on {model.family} yet", "latent_image",
                          "wrong_latent")
    flow = FlowModel.for_family(model.family, model.sampling_shift)
    schedule = sigma_slice(sigmas(scheduler, flow, steps, denoise=denoise, sampler=sampler_name),  # type: ignore[arg-type]
                           start, end, leftover)
    if len(schedule) < 2:
        return latent
    with materialize(ctx, model) as resident:
        transformer = resident.pipe.transformer
        device, dtype = resident.device, transformer.dtype
        samples = latent.samples
        channels = transformer.config.in_channels // (4 if model.family == "flux" else 1)
        if samples.shape[1] != channels:
            raise NodeFailure(f"the latent has {samples.shape[1]} channels; this model takes {channels} "
                              "(EmptySD3LatentImage makes 16)", "latent_image", "wrong_latent")
        batch, _, height, width = samples.shape
        noise = initial_noise(seed, samples.shape) if add_noise else torch.zeros_like(samples)
        cond, uncond = (_flow_cond(c, batch, dtype, device, model.family, name)
                        for c, name in ((positive, "positive"), (negative, "negative")))
        guided = FlowDenoiser(transformer_velocity(transformer, model.family == "flux", dtype), cond, uncond, cfg)

        def on_step(i: int, total: int, x: Any, denoised: Any) -> None:
            if model.schedules:
                resident.set_step(i + 1)
            ctx.progress(i + 1, total)

        def run() -> Any:
            if model.schedules:
                resident.set_step(0)
            x = flow_noised(samples.to(device), noise.to(device), schedule[0])
            with torch.inference_mode(), watch_compile(ctx, resident):
                return sample(sampler_name, guided, x, schedule, seed=seed, callback=on_step,
                              cancel_check=ctx.check_cancelled)

        out = retry_out_of_memory(ctx, run, f"sampling {batch}× {width * 8}×{height * 8}")
    return Latent(out, latent.noise_mask)


def _flow_cond(entries: Conditioning, batch: int, dtype: Any, device: str, family: str, name: str) -> dict[str, Any]:
    import torch

    if any(e.pooled is None for e in entries.entries):
        raise NodeFailure(f"{family} needs conditioning from its own CLIP (T5 and pooled CLIP embeddings)", name,
                          "wrong_conditioning")

    def stacked(tensors: list[Any]) -> Any:
        together = torch.stack(tensors)
        return together[None].expand(batch, *together.shape).to(device, dtype)

    cond = {"embeds": stacked([e.embeds[0] for e in entries.entries]),
            "pooled": stacked([e.pooled[0] for e in entries.entries if e.pooled is not None])}
    if family == "flux":
        cond["guidance"] = torch.tensor([float(e.extras.get("guidance", DEFAULT_FLUX_GUIDANCE))
                                         for e in entries.entries], device=device)
    return cond
