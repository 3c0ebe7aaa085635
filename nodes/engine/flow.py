"""Flow matching for KSampler: SD3's and Flux's noise levels and their transformers as ComfyUI-style denoisers.

These models predict a velocity v = noise - x0 along x_sigma = (1 - sigma) x0 + sigma noise, sigma in [0, 1]
(ComfyUI's CONST prediction), so the denoised estimate is x - sigma v and the k-diffusion ODE samplers in
`samplers` run unchanged on it. The noise levels follow ComfyUI's model sampling:
- SD3 (ModelSamplingDiscreteFlow): sigma(t) = shift t / (1 + (shift - 1) t) over 1000 steps, shift 3 by default;
  the transformer sees timestep = 1000 sigma.
- Flux (ModelSamplingFlux): sigma(t) = e^mu / (e^mu + 1/t - 1) over 10000 steps, mu = shift (1.15 by default,
  or from the image size with ModelSamplingFlux, as diffusers' resolution-dependent shift); the transformer sees
  sigma (diffusers' Flux multiplies by 1000 inside).

    model = FlowModel.for_family("flux", shift=1.15)
    s = sigmas("simple", model, 20)        # nodes.engine.sigmas works on any model with this interface
    x = flow_noised(latent, noise, s[0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: Samplers that are plain ODE steps on the denoised estimate (the others draw noise the VP way).
FLOW_SAMPLERS = ("euler", "heun", "dpm_2", "lms", "dpmpp_2m", "ddim")
DEFAULT_SHIFT = {"sd3": 3.0, "flux": 1.15}


@dataclass(frozen=True, eq=False)
class FlowModel:
    """The noise levels of a flow-matching model, with `DiscreteModel`'s interface for the schedulers."""

    sigmas: Tensor  # ascending
    log_sigmas: Tensor
    shift: float
    flux: bool
    prediction: str = "flow"

    @classmethod
    def for_family(cls, family: str, shift: float = 0.0) -> FlowModel:
        shift = shift or DEFAULT_SHIFT[family]
        flux = family == "flux"
        steps = 10000 if flux else 1000
        t = torch.arange(1, steps + 1, dtype=torch.float64) / steps
        model = cls(torch.zeros(0), torch.zeros(0), shift, flux)
        sigmas = model._shifted(t).float()
        return cls(sigmas, sigmas.log(), shift, flux)

    def _shifted(self, t: Tensor) -> Tensor:
        if self.flux:
            return math.exp(self.shift) / (math.exp(self.shift) + (1 / t - 1))
        return self.shift * t / (1 + (self.shift - 1) * t)

    @property
    def sigma_min(self) -> Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: Tensor) -> Tensor:
        """ComfyUI's timestep for a sigma: sigma itself for Flux, 1000 sigma for SD3 (continuous, not rounded)."""
        return sigma if self.flux else sigma * 1000

    def sigma(self, timestep: Tensor) -> Tensor:
        t = timestep.double() if self.flux else timestep.double() / 1000
        return self._shifted(t.clamp(1e-9, 1.0)).float()


def flux_shift(width: int, height: int, max_shift: float = 1.15, base_shift: float = 0.5) -> float:
    """ComfyUI's ModelSamplingFlux (and diffusers' dynamic shift): mu linear in the image's token count,
    base_shift at 256 tokens and max_shift at 4096."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return width * height / (8 * 8 * 2 * 2) * slope + (base_shift - slope * 256)


def flow_noised(latent: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """Where flow sampling starts: the straight line between the latent and the noise at sigma."""
    sigma = sigma.to(noise)
    return sigma * noise + (1 - sigma) * latent


class FlowDenoiser:
    """denoised = x - sigma v, with classifier-free guidance on it at cfg != 1 (two passes, as ComfyUI's)."""

    def __init__(self, velocity: Any, cond: dict[str, Any], uncond: dict[str, Any], cfg: float) -> None:
        self.velocity, self.cond, self.uncond, self.cfg = velocity, cond, uncond, cfg

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = sigma.reshape(()).to(x)
        cond = x - s * self.velocity(x, s, self.cond)
        if math.isclose(self.cfg, 1.0):
            return cond
        uncond = x - s * self.velocity(x, s, self.uncond)
        return uncond + (cond - uncond) * self.cfg


def transformer_velocity(transformer: Any, flux: bool, dtype: torch.dtype) -> Any:
    """v(x, sigma, cond) of a diffusers SD3 or Flux transformer on (batch, channels, height, width) latents.

    `cond` holds `embeds` (batch, entries, tokens, dim), `pooled` (batch, entries, dim) and, for Flux, `guidance`
    (entries,): several entries are predicted separately and averaged, as ComfyUI does for combined conditioning.
    """

    def velocity(x: Tensor, sigma: Tensor, cond: dict[str, Any]) -> Tensor:
        embeds, pooled = cond["embeds"], cond["pooled"]
        rows, entries = embeds.shape[:2]
        x_in = x.to(dtype).repeat_interleave(entries, 0)
        embeds, pooled = embeds.flatten(0, 1), pooled.flatten(0, 1)
        n = x_in.shape[0]
        if flux:
            out = _flux_forward(transformer, x_in, sigma, embeds, pooled, cond["guidance"].repeat(rows).to(x_in))
        else:
            out = transformer(hidden_states=x_in, timestep=(sigma * 1000).expand(n).to(x_in),
                              encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        return out.float().unflatten(0, (rows, entries)).mean(1)

    return velocity


def _flux_forward(transformer: Any, x: Tensor, sigma: Tensor, embeds: Tensor, pooled: Tensor,
                  guidance: Tensor) -> Tensor:
    """Flux on unpacked latents: 2×2 patches in, as diffusers' FluxPipeline packs them, and back."""
    batch, channels, height, width = x.shape
    packed = x.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    packed = packed.reshape(batch, (height // 2) * (width // 2), channels * 4)
    ids = torch.zeros(height // 2, width // 2, 3, device=x.device)
    ids[..., 1] += torch.arange(height // 2, device=x.device)[:, None]
    ids[..., 2] += torch.arange(width // 2, device=x.device)[None, :]
    kwargs: dict[str, Any] = {}
    if transformer.config.guidance_embeds:
        kwargs["guidance"] = guidance
    out = transformer(hidden_states=packed, timestep=sigma.expand(batch).to(x), encoder_hidden_states=embeds,
                      pooled_projections=pooled, txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device),
                      img_ids=ids.reshape(-1, 3), return_dict=False, **kwargs)[0]
    out = out.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(batch, channels, height, width)
