"""Sample for the transformer families (SD3, Flux): the checkpoint's own diffusers pipeline, flow matching.

Flux.1-dev is guidance-distilled: `guidance` goes into the transformer's guidance embedding (one pass per step,
no negative prompt); schnell has no embedding and ignores it. SD3 uses classifier-free guidance with a negative
prompt. Both sample with the flow-matching Euler scheduler their folders ship, with its shift (SD3: fixed;
Flux dev: resolution-dependent, computed by the pipeline from the image's token count).

The starting noise is the same CPU draw as everywhere (`sigmas.initial_noise`: one float32 `randn` of the
(batch, channels, height/8, width/8) latent from the seed), packed into Flux's 2×2 patches where needed.
"""

from __future__ import annotations

from typing import Any

from nodegraph.context import Context, NodeFailure
from nodes.engine.recipe import ModelRecipe

#: Sample's scheduler choices that these families can run (flow matching has its own Euler).
FLOW_SCHEDULERS = ("euler",)


def sample_transformer(ctx: Context, model: ModelRecipe, prompt: str, negative_prompt: str, seed: int, steps: int,
                       guidance: float, width: int, height: int, scheduler: str, batch_size: int) -> Any:
    """Images (batch, height, width, 3) in [0, 1] as numpy, from the family's pipeline with the recipe's LoRAs."""
    import diffusers
    import torch

    from nodes.engine.memory import bounded_decode, noise_generator
    from nodes.engine.pipelines import materialize, retry_out_of_memory, watch_compile
    from nodes.engine.sigmas import initial_noise

    if scheduler not in FLOW_SCHEDULERS:
        raise NodeFailure(f"{model.family} samples with flow matching; scheduler must be one of "
                          f"{', '.join(FLOW_SCHEDULERS)}, not {scheduler!r}", "scheduler", "invalid_value")
    flux = model.family == "flux"
    if flux and negative_prompt:
        raise NodeFailure("Flux takes no negative prompt (its guidance is embedded in the model); leave it empty",
                          "negative_prompt", "invalid_value")
    with materialize(ctx, model, model.clip()) as resident:
        pipe = resident.pipe
        if pipe.vae is None or pipe.text_encoder is None:
            raise NodeFailure(f"{model.checkpoint.rsplit('/', 1)[-1]} holds only the transformer; Sample needs its "
                              "text encoders and VAE (load a diffusers folder, or use KSampler with a CLIP and VAE "
                              "from one)", "model", "wrong_model")
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(resident.scheduler_config)
        transformer = pipe.transformer
        scheduled = bool(resident.applied.schedules)

        def on_step(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if scheduled:
                resident.set_step(step + 1)
            ctx.progress(step + 1, steps)
            return {}

        def run() -> Any:
            if scheduled:
                resident.set_step(0)
            generator = noise_generator(seed)
            channels = pipe.vae.config.latent_channels
            shape = (batch_size, channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
            latents = initial_noise(generator, shape)
            if flux:
                latents = pipe._pack_latents(latents, batch_size, channels, shape[2], shape[3])
            kwargs: dict[str, Any] = {} if flux else {"negative_prompt": negative_prompt or None}
            ctx.check_cancelled()
            with torch.inference_mode(), watch_compile(ctx, resident), bounded_decode(ctx, pipe.vae, width, height):
                return pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, width=width,
                            height=height, num_images_per_prompt=batch_size,
                            latents=latents.to(resident.device, transformer.dtype), generator=generator,
                            output_type="np", callback_on_step_end=on_step, **kwargs)

        result = retry_out_of_memory(ctx, run, f"sampling {batch_size}× {width}×{height}")
    return result.images
