"""KSampler's noise-mask blend (inpainting): only where the mask is 1 is the latent repainted.

At every model call, where the mask is 0 the model is shown the input latent noised to the current sigma,
`latent + noise · sigma`, and its estimate there is replaced by the input latent, so each step's x0 keeps the
unmasked region (a mask between 0 and 1 mixes the two). Which noise re-noises the kept region is ComfyUI's rule:
the run's initial noise (zeros when KSamplerAdvanced's add_noise is off), except for `ddim`, which ComfyUI runs
as euler with a fresh draw here: one float32 CPU `randn` of the latent's shape from seed + 1, whether or not
noise was added.

    denoiser = MaskedDenoiser(guided, mask, latent, blend_noise(sampler_name, noise, seed))
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from nodes.engine.sigmas import initial_noise, next_seed


def blend_noise(sampler: str, noise: Tensor, seed: int) -> Tensor:
    """The noise that re-noises the unmasked region: `noise` itself, or ddim's own draw from seed + 1."""
    if sampler != "ddim":
        return noise
    return initial_noise(next_seed(seed), noise.shape).to(noise)


class MaskedDenoiser:
    """D(x, sigma) restricted to `mask` (broadcast over channels): the input latent everywhere else."""

    def __init__(self, denoiser: Callable[[Tensor, Tensor], Tensor], mask: Tensor, latent: Tensor,
                 noise: Tensor) -> None:
        self.denoiser, self.mask, self.latent, self.noise = denoiser, mask, latent, noise

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        keep = 1 - self.mask
        x = x * self.mask + (self.latent + self.noise * sigma.to(x)) * keep
        return self.denoiser(x, sigma) * self.mask + self.latent * keep
