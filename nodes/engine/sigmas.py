"""Noise levels for ComfyUI-style sampling: a discrete model's sigmas, the schedulers, denoise and step slicing.

Everything here follows ComfyUI's numbers, so a workflow gives ComfyUI's image on the same weights:
- `DiscreteModel.from_config` turns a diffusers scheduler config (SD1.x/SD2.x/SDXL: `beta_start`, `beta_end`,
  `beta_schedule`, `num_train_timesteps`, `prediction_type`) into the training noise levels
  sigma_t = sqrt((1 - alphā_t) / alphā_t), computed in float64 and kept in float32 as ComfyUI does.
  `timestep(sigma)` is the nearest training index in log-sigma (what the UNet sees); `sigma(t)` interpolates
  log-sigma at a fractional t.
- `sigmas(scheduler, model, steps, denoise=, sampler=)` is the schedule a KSampler runs (steps + 1 values
  ending in 0, with ComfyUI's quirks: `denoise` < 1 keeps the tail of a longer schedule, dpm_2/uni_pc drop the
  penultimate sigma of a schedule one step longer, `ddim_uniform` and `beta` may give a step more or fewer).
- `sigma_slice` is KSamplerAdvanced's start/end steps; `initial_noise` and `noised_latent` start a run.

    model = DiscreteModel.from_config(pipe.scheduler.config)
    s = sigmas("karras", model, 20)          # tensor([14.6146, ..., 0.0292, 0.])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nodes.engine.choices import SCHEDULERS

# Samplers whose schedule ComfyUI computes one step longer and then drops the penultimate sigma of.
DISCARD_PENULTIMATE = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc"})
PREDICTIONS = ("epsilon", "v_prediction")


@dataclass(frozen=True, eq=False)
class DiscreteModel:
    """The noise levels of a model trained on discrete timesteps (ComfyUI's ModelSamplingDiscrete)."""

    sigmas: Tensor  # float32, ascending: sigmas[t] for t = 0 … num_train_timesteps - 1
    log_sigmas: Tensor
    prediction: str = "epsilon"

    @classmethod
    def from_betas(cls, beta_start: float, beta_end: float, schedule: str = "scaled_linear",
                   timesteps: int = 1000, prediction: str = "epsilon") -> DiscreteModel:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction_type {prediction!r} is not supported; one of {', '.join(PREDICTIONS)}")
        if timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, not {timesteps}")
        if schedule == "scaled_linear":  # ldm's "linear": linear in sqrt(beta)
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        elif schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        else:
            raise ValueError(f"beta_schedule {schedule!r} is not supported; one of scaled_linear, linear")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        # ComfyUI takes the log in float64 and stores both in float32.
        return cls(sigmas.float(), sigmas.log().float(), prediction)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DiscreteModel:
        """From a diffusers scheduler config (a FrozenDict or a plain dict); diffusers' defaults fill gaps."""
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler config: trained_betas is not supported")
        if config.get("rescale_betas_zero_snr"):
            raise ValueError("scheduler config: rescale_betas_zero_snr is not supported")
        return cls.from_betas(float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012)),
                              str(config.get("beta_schedule", "scaled_linear")),
                              int(config.get("num_train_timesteps", 1000)),
                              str(config.get("prediction_type", "epsilon")))

    @property
    def sigma_min(self) -> Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: Tensor) -> Tensor:
        """The training index whose log-sigma is nearest (ComfyUI quantises; diffusers would interpolate)."""
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep: Tensor) -> Tensor:
        """Sigma at a (fractional) timestep, interpolated linearly in log-sigma."""
        t = timestep.float().to(self.log_sigmas.device).clamp(0, len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp().to(timestep.device)


def schedule(scheduler: str, model: DiscreteModel, steps: int) -> Tensor:
    """The named schedule itself: `steps` sigmas from high to low, then 0 (ddim_uniform, beta: see the README)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    if scheduler in ("normal", "sgm_uniform"):
        # Linear in timestep from t(sigma_max) to t(sigma_min); sgm_uniform spaces steps + 1 and drops the last.
        start, end = model.timestep(model.sigma_max), model.timestep(model.sigma_min)
        ts = torch.linspace(start, end, steps + 1)[:-1] if scheduler == "sgm_uniform" else \
            torch.linspace(start, end, steps)
        return _with_zero([float(model.sigma(t)) for t in ts])
    if scheduler == "karras":  # Karras et al. 2022, eq. 5, rho = 7
        rho, lo, hi = 7.0, float(model.sigma_min), float(model.sigma_max)
        ramp = torch.linspace(0, 1, steps)
        return _append_zero((hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho)
    if scheduler == "exponential":  # uniform in log-sigma
        lo, hi = float(model.sigma_min), float(model.sigma_max)
        return _append_zero(torch.linspace(math.log(hi), math.log(lo), steps).exp())
    if scheduler == "simple":  # every len/steps-th training sigma, from the top
        stride = len(model.sigmas) / steps
        return _with_zero([float(model.sigmas[-(1 + int(i * stride))]) for i in range(steps)])
    if scheduler == "ddim_uniform":  # training indices 1, 1 + k, 1 + 2k, … with k = len // steps, reversed
        stride = max(len(model.sigmas) // steps, 1)
        return _with_zero([float(model.sigmas[i]) for i in range(1, len(model.sigmas), stride)][::-1])
    if scheduler == "beta":
        return _beta(model, steps)
    raise ValueError(f"unknown scheduler {scheduler!r}; one of {', '.join(SCHEDULERS)}")


def _beta(model: DiscreteModel, steps: int, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """Timesteps at the beta distribution's quantiles (Lee et al. 2024), rounded; repeats are dropped."""
    import numpy as np
    from scipy import stats

    last = len(model.sigmas) - 1
    ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), alpha, beta) * last)
    picked: list[float] = []
    previous = None
    for t in ts:
        if t != previous:
            picked.append(float(model.sigmas[int(t)]))
        previous = t
    return _with_zero(picked)


def _with_zero(values: list[float]) -> Tensor:
    return torch.tensor([*values, 0.0], dtype=torch.float32)


def _append_zero(x: Tensor) -> Tensor:
    return torch.cat([x, x.new_zeros([1])])


def sigmas(scheduler: str, model: DiscreteModel, steps: int, *, denoise: float = 1.0,
           sampler: str | None = None) -> Tensor:
    """The sigmas a KSampler with these widgets runs (empty when denoise is 0: nothing to sample)."""
    if denoise > 0.9999:
        return _for_sampler(scheduler, model, steps, sampler)
    if denoise <= 0.0:
        return torch.zeros(0)
    # A partial denoise runs the last steps of a longer schedule.
    return _for_sampler(scheduler, model, int(steps / denoise), sampler)[-(steps + 1):]


def _for_sampler(scheduler: str, model: DiscreteModel, steps: int, sampler: str | None) -> Tensor:
    if sampler not in DISCARD_PENULTIMATE:
        return schedule(scheduler, model, steps)
    s = schedule(scheduler, model, steps + 1)
    return torch.cat([s[:-2], s[-1:]])


def sigma_slice(sigmas: Tensor, start: int, end: int, leftover: bool) -> Tensor:
    """KSamplerAdvanced's start_at_step/end_at_step: `sigmas[start:end + 1]`.

    Unless `leftover` (return_with_leftover_noise), a run that stops early ends at sigma 0, fully denoised.
    An empty result means there is nothing to sample: the latent comes back as it is.
    """
    if start < 0 or end < 0:
        raise ValueError(f"start_at_step and end_at_step must not be negative ({start}, {end})")
    if end < len(sigmas) - 1:
        sigmas = sigmas[:end + 1].clone()
        if not leftover:
            sigmas[-1] = 0.0
    if start >= len(sigmas) - 1:
        return sigmas[:0]
    return sigmas[start:]


def initial_noise(seed: int | torch.Generator, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """The starting noise of a seed: one float32 `randn` of the whole latent on the CPU, whatever the device
    (ComfyUI's rule). Given a CPU generator instead of a seed, the draw continues that generator."""
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), dtype=torch.float32, generator=generator, device="cpu")


def next_seed(seed: int) -> int:
    """seed + 1, ComfyUI's seed for noise drawn during sampling, as the 64-bit generator takes it (the largest
    seed wraps to 0 instead of overflowing)."""
    return (seed + 1) % 2**64


def noised_latent(model: DiscreteModel, latent: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """Where sampling starts: the latent plus noise at sigmas[0].

    From the top of the schedule ComfyUI scales the noise by sqrt(1 + sigma²) rather than sigma, so the
    model input x / sqrt(sigma² + 1) has unit variance; a partial run (denoise < 1, a later start) uses sigma.
    """
    if len(sigmas) == 0:  # nothing to sample (denoise 0, or a start at or past the last step)
        return latent
    sigma = sigmas[0].to(noise)
    top = float(model.sigma_max)
    if math.isclose(top, float(sigma), rel_tol=1e-5) or float(sigma) > top:
        return latent + noise * torch.sqrt(1.0 + sigma ** 2.0)
    return latent + noise * sigma
