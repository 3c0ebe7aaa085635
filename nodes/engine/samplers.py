"""ComfyUI-compatible samplers over any noise-predicting model: the CFG denoiser and k-diffusion's samplers.

A KSampler node runs:

    model = DiscreteModel.from_config(pipe.scheduler.config)                 # nodes.engine.sigmas
    s = sigmas(scheduler, model, steps, denoise=denoise, sampler=name)
    x = noised_latent(model, latent, initial_noise(seed, latent.shape).to(latent), s)
    denoiser = CFGDenoiser(model, unet_eps, cond={...}, uncond={...}, cfg=7.5)
    latent = sample(name, denoiser, x, s, seed=seed, callback=..., cancel_check=ctx.check_cancelled)

`unet_eps(x_in, timestep, cond)` is the caller's: it runs the UNet on the scaled input at the (quantised,
float) timesteps with the conditioning dict it was given, and returns eps (or v). The dict is opaque here:
for CFG the uncond and cond dicts are concatenated along the batch (tensors, nested dicts; other values must be
equal), so ControlNet residuals, masks or SDXL's added_cond_kwargs travel through; dicts that cannot be
concatenated are run as two passes. The samplers follow Karras et al. 2022 (euler, heun), k-diffusion (dpm_2,
lms, ancestral steps), DPM-Solver++ (Lu et al. 2022: 2m, sde, 2m_sde), UniPC (Zhao et al. 2023, B(h) = h) and
LCM, with ComfyUI's numerics. Noise inside samplers is drawn on the CPU in float32, so a seed gives the same
image on every device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nodes.engine.choices import SAMPLERS
from nodes.engine.finite import FiniteWatch
from nodes.engine.sigmas import DiscreteModel, next_seed

EpsModel = Callable[[Tensor, Tensor, dict[str, Any]], Tensor]
Denoise = Callable[[Tensor, Tensor], Tensor]
Noise = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, int, Tensor, Tensor], None]



def concat_conds(conds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One conditioning dict for a batch of several (tensors joined on dim 0), or None if they do not fit."""
    first = conds[0]
    if any(c.keys() != first.keys() for c in conds):
        return None
    out: dict[str, Any] = {}
    for key, value in first.items():
        values = [c[key] for c in conds]
        if isinstance(value, Tensor):
            if not all(isinstance(v, Tensor) and v.shape[1:] == value.shape[1:] for v in values):
                return None
            out[key] = torch.cat(values)
        elif isinstance(value, dict):
            inner = concat_conds(values)
            if inner is None:
                return None
            out[key] = inner
        elif all(v is value or (not isinstance(v, Tensor) and v == value) for v in values):
            out[key] = value
        else:
            return None
    return out


class CFGDenoiser:
    """denoised = D(x, sigma): the model's x0 estimate, with classifier-free guidance on it as ComfyUI does."""

    def __init__(self, model: DiscreteModel, eps_model: EpsModel, cond: dict[str, Any],
                 uncond: dict[str, Any] | None = None, cfg: float = 1.0) -> None:
        self.model, self.eps_model, self.cond, self.uncond, self.cfg = model, eps_model, cond, uncond, cfg

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.uncond is None or math.isclose(self.cfg, 1.0):
            return self.denoise(x, sigma, self.cond)  # ComfyUI skips the uncond pass at cfg 1
        both = concat_conds([self.uncond, self.cond])
        if both is None:
            uncond, cond = self.denoise(x, sigma, self.uncond), self.denoise(x, sigma, self.cond)
        else:
            uncond, cond = self.denoise(torch.cat([x, x]), sigma, both).chunk(2)
        return uncond + (cond - uncond) * self.cfg

    def denoise(self, x: Tensor, sigma: Tensor, cond: dict[str, Any]) -> Tensor:
        s = sigma.reshape(()).to(x)
        timestep = self.model.timestep(s.expand(x.shape[0])).float()
        out = self.eps_model(x / (s ** 2 + 1.0) ** 0.5, timestep, cond).to(x.dtype)
        if self.model.prediction == "v_prediction":
            return x / (s ** 2 + 1.0) - out * s / (s ** 2 + 1.0) ** 0.5
        return x - out * s


def sample(name: str, denoiser: Denoise, x: Tensor, sigmas: Tensor, *, seed: int,
           callback: StepCallback | None = None, cancel_check: Callable[[], None] | None = None) -> Tensor:
    """Run sampler `name` from x at sigmas[0] down the schedule; returns the final latent.

    `callback(step, total, x, denoised)` follows each step; `cancel_check()` precedes each model call and
    stops sampling by raising. Ancestral, SDE and lcm noise comes from `seed` (see the README for how it
    matches ComfyUI).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; one of {', '.join(SAMPLERS)}")
    if len(sigmas) < 2:
        return x
    sigmas = sigmas.to(device=x.device, dtype=torch.float32)

    def model(x_: Tensor, sigma: Tensor) -> Tensor:
        if cancel_check is not None:
            cancel_check()
        return denoiser(x_, sigma)

    total = len(sigmas) - 1
    watch = FiniteWatch(name, total, lag=x.device.type != "cpu")

    def step(i: int, x_: Tensor, denoised: Tensor) -> None:
        watch.after(i, x_)
        if callback is not None:
            callback(i, total, x_, denoised)

    if name == "uni_pc":
        out = _uni_pc(model, x, sigmas, step)
    elif name in ("dpmpp_sde", "dpmpp_2m_sde"):
        noise = brownian_noise(x, sigmas, seed)
        out = (_dpmpp_sde if name == "dpmpp_sde" else _dpmpp_2m_sde)(model, x, sigmas, noise, step)
    elif name in ("euler_ancestral", "dpm_2_ancestral", "lcm"):
        out = _STOCHASTIC[name](model, x, sigmas, gaussian_noise(x, seed), step)
    else:
        out = _DETERMINISTIC["euler" if name == "ddim" else name](model, x, sigmas, step)
    watch.done()
    return out


def gaussian_noise(x: Tensor, seed: int) -> Noise:
    """Fresh N(0, I) per call from one CPU generator. ComfyUI on the CPU seeds it with seed + 1 (so it differs
    from the initial noise); on CUDA it uses a CUDA generator, which we do not, to stay device-independent."""
    generator = torch.Generator().manual_seed(next_seed(seed))
    return lambda sigma, sigma_next: torch.randn(x.shape, dtype=torch.float32, generator=generator).to(x)


def brownian_noise(x: Tensor, sigmas: Tensor, seed: int) -> Noise:
    """ComfyUI's Brownian-tree noise (torchsde, on the CPU): the increment W(sigma_next) - W(sigma), scaled to
    unit variance, so a finer schedule refines the same path rather than drawing a new one."""
    import torchsde

    lo, hi = sigmas[sigmas > 0].min().cpu(), sigmas.max().cpu()
    tree = torchsde.BrownianTree(lo, torch.zeros(x.shape, dtype=torch.float32), hi, entropy=seed)

    def noise(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        a, b = sigma.reshape(()).cpu().float(), sigma_next.reshape(()).cpu().float()
        low, high, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        with warnings.catch_warnings():  # torchsde rounds the tree's ends to 1e-6 and warns when we touch them
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w: Tensor = tree(low, high)
        return (w * sign).to(x) / (b - a).abs().to(x.device).sqrt()
    return noise


def _d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    return (x - denoised) / sigma


def _ancestral(sigma: Tensor, sigma_next: Tensor) -> tuple[Tensor, Tensor]:
    """Split a step to sigma_next into a deterministic step down to sigma_down plus fresh noise sigma_up (eta 1)."""
    up = torch.minimum(sigma_next, (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - up ** 2) ** 0.5, up


def _euler(model: Denoise, x: Tensor, s: Tensor, step: Callable[..., None]) -> Tensor:
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        x = x + _d(x, s[i], denoised) * (s[i + 1] - s[i])
        step(i, x, denoised)
    return x


def _heun(model: Denoise, x: Tensor, s: Tensor, step: Callable[..., None]) -> Tensor:
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        d, dt = _d(x, s[i], denoised), s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
        else:  # trapezoid: average the slopes at both ends
            x_2 = x + d * dt
            d_2 = _d(x_2, s[i + 1], model(x_2, s[i + 1]))
            x = x + (d + d_2) / 2 * dt
        step(i, x, denoised)
    return x


def _dpm_2(model: Denoise, x: Tensor, s: Tensor, step: Callable[..., None]) -> Tensor:
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        d = _d(x, s[i], denoised)
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - s[i])
        else:  # midpoint in log-sigma
            mid = s[i].log().lerp(s[i + 1].log(), 0.5).exp()
            x_2 = x + d * (mid - s[i])
            x = x + _d(x_2, mid, model(x_2, mid)) * (s[i + 1] - s[i])
        step(i, x, denoised)
    return x


def _euler_ancestral(model: Denoise, x: Tensor, s: Tensor, noise: Noise, step: Callable[..., None]) -> Tensor:
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        down, up = _ancestral(s[i], s[i + 1])
        if down == 0:
            x = denoised
        else:
            x = x + _d(x, s[i], denoised) * (down - s[i]) + noise(s[i], s[i + 1]) * up
        step(i, x, denoised)
    return x


def _dpm_2_ancestral(model: Denoise, x: Tensor, s: Tensor, noise: Noise, step: Callable[..., None]) -> Tensor:
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        down, up = _ancestral(s[i], s[i + 1])
        d = _d(x, s[i], denoised)
        if down == 0:
            x = x + d * (down - s[i])
        else:
            mid = s[i].log().lerp(down.log(), 0.5).exp()
            x_2 = x + d * (mid - s[i])
            x = x + _d(x_2, mid, model(x_2, mid)) * (down - s[i])
            x = x + noise(s[i], s[i + 1]) * up
        step(i, x, denoised)
    return x


def _lcm(model: Denoise, x: Tensor, s: Tensor, noise: Noise, step: Callable[..., None]) -> Tensor:
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        x = denoised  # jump to the estimate, then re-noise to the next level
        if s[i + 1] > 0:
            x = noise(s[i], s[i + 1]) * s[i + 1] + x
        step(i, x, denoised)
    return x


def _lms_coefficient(order: int, t: np.ndarray, i: int, j: int) -> float:
    """∫ from t[i] to t[i+1] of the Lagrange basis polynomial through t[i], t[i-1], … that is 1 at t[i-j]."""
    basis = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            basis *= np.polynomial.Polynomial([-t[i - k], 1.0]) / (t[i - j] - t[i - k])
    integral = basis.integ()
    return float(integral(t[i + 1]) - integral(t[i]))


def _lms(model: Denoise, x: Tensor, s: Tensor, step: Callable[..., None], order: int = 4) -> Tensor:
    t = s.detach().cpu().double().numpy()
    ds: list[Tensor] = []
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        ds = [*ds, _d(x, s[i], denoised)][-order:]
        if s[i + 1] == 0:
            x = denoised
        else:
            n = min(i + 1, order)
            x = x + sum(_lms_coefficient(n, t, i, j) * d for j, d in enumerate(reversed(ds)))
        step(i, x, denoised)
    return x


def _dpmpp_2m(model: Denoise, x: Tensor, s: Tensor, step: Callable[..., None]) -> Tensor:
    old: Tensor | None = None
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        t, t_next = -s[i].log(), -s[i + 1].log()
        h = t_next - t
        if old is None or s[i + 1] == 0:
            x = (s[i + 1] / s[i]) * x - (-h).expm1() * denoised
        else:  # second order from the previous estimate
            r = (t + s[i - 1].log()) / h
            x = (s[i + 1] / s[i]) * x - (-h).expm1() * ((1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old)
        old = denoised
        step(i, x, denoised)
    return x


def _dpmpp_2m_sde(model: Denoise, x: Tensor, s: Tensor, noise: Noise, step: Callable[..., None]) -> Tensor:
    old: Tensor | None = None
    h_last: Tensor | None = None
    h: Tensor | None = None
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised
        else:  # eta 1, midpoint correction
            lam, lam_next = -s[i].log(), -s[i + 1].log()
            h = lam_next - lam
            alpha_t = s[i + 1] * lam_next.exp()
            x = s[i + 1] / s[i] * (-h).exp() * x + alpha_t * (-2 * h).expm1().neg() * denoised
            if old is not None and h_last is not None:
                x = x + 0.5 * alpha_t * (-2 * h).expm1().neg() * (1 / (h_last / h)) * (denoised - old)
            x = x + noise(s[i], s[i + 1]) * s[i + 1] * (-2 * h).expm1().neg().sqrt()
        old, h_last = denoised, h
        step(i, x, denoised)
    return x


def _dpmpp_sde(model: Denoise, x: Tensor, s: Tensor, noise: Noise, step: Callable[..., None]) -> Tensor:
    r, fac = 0.5, 1.0
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised
        else:  # two stochastic DPM-Solver++ stages, the first to the log-SNR midpoint
            lam, lam_next = -s[i].log(), -s[i + 1].log()
            lam_mid = lam + r * (lam_next - lam)
            sigma_mid = (-lam_mid).exp()
            alpha, alpha_mid, alpha_next = s[i] * lam.exp(), sigma_mid * lam_mid.exp(), s[i + 1] * lam_next.exp()
            down, up = _ancestral((-lam).exp(), (-lam_mid).exp())
            h = -down.log() - lam
            x_2 = (alpha_mid / alpha) * (-h).exp() * x - alpha_mid * (-h).expm1() * denoised
            x_2 = x_2 + alpha_mid * noise(s[i], sigma_mid) * up
            denoised_2 = model(x_2, sigma_mid)
            down, up = _ancestral((-lam).exp(), (-lam_next).exp())
            h = -down.log() - lam
            mixed = (1 - fac) * denoised + fac * denoised_2
            x = (alpha_next / alpha) * (-h).exp() * x - alpha_next * (-h).expm1() * mixed
            x = x + alpha_next * noise(s[i], s[i + 1]) * up
        step(i, x, denoised)
    return x


def _uni_pc(model: Denoise, x: Tensor, s: Tensor, step: Callable[..., None]) -> Tensor:
    """UniPC with B(h) = h (Zhao et al. 2023), multistep on data predictions, as ComfyUI's `uni_pc` runs it:
    in the variance-preserving form x_vp = x / sqrt(1 + sigma²), order min(3, steps - 1), lower orders for the
    first and last steps, a corrector after every step but the last, stopping at sigma 0.001 instead of 0."""
    ts = s.clone()
    if ts[-1] == 0:
        ts[-1] = 0.001
    n = len(ts) - 1
    order = max(1, min(3, n - 1))

    def data(x_vp: Tensor, sigma: Tensor) -> Tensor:  # the model's x0 from a VP input
        x_ve = x_vp * (sigma ** 2 + 1.0) ** 0.5
        eps = (x_ve - model(x_ve, sigma)) / sigma
        return (x_vp - _vp_std(sigma) * eps) / _vp_alpha(sigma)

    x = x / torch.sqrt(1.0 + ts[0] ** 2.0)
    estimates, at = [data(x, ts[0])], [ts[0]]
    for i in range(1, n + 1):
        k = min(order, i, n + 1 - i)
        x, estimate = _unipc_step(data, x, estimates[-k:], at[-k:], ts[i], k, corrector=i < n)
        if estimate is not None:
            estimates, at = [*estimates, estimate][-order:], [*at, ts[i]][-order:]
        step(i - 1, x / _vp_alpha(ts[i]), estimates[-1])
    return x / _vp_alpha(ts[-1])


def _vp_log_alpha(sigma: Tensor) -> Tensor:
    return 0.5 * torch.log(1 / (sigma * sigma + 1))


def _vp_alpha(sigma: Tensor) -> Tensor:
    return torch.exp(_vp_log_alpha(sigma))


def _vp_std(sigma: Tensor) -> Tensor:
    return torch.sqrt(1.0 - torch.exp(2.0 * _vp_log_alpha(sigma)))


def _vp_lambda(sigma: Tensor) -> Tensor:  # half log-SNR
    return _vp_log_alpha(sigma) - 0.5 * torch.log(1.0 - torch.exp(2.0 * _vp_log_alpha(sigma)))


def _unipc_step(data: Denoise, x: Tensor, estimates: list[Tensor], at: list[Tensor], t: Tensor, k: int,
                corrector: bool) -> tuple[Tensor, Tensor | None]:
    """One UniPC step of order k from at[-1] to t: predictor, then (optionally) the corrector, which costs the
    model call at t whose estimate the next step reuses."""
    lam_prev = _vp_lambda(at[-1])
    h = _vp_lambda(t) - lam_prev
    newest = estimates[-1]
    ratios = [(_vp_lambda(at[-(j + 1)]) - lam_prev) / h for j in range(1, k)]
    diffs = [(estimates[-(j + 1)] - newest) / r for j, r in enumerate(ratios, 1)]
    rks = torch.stack([*ratios, torch.ones_like(h)]).float()
    hh = -h
    # The right-hand side b_i = i! * phi_(i+1)(hh) / B(h) is a near-cancelling recurrence: float64 on the CPU.
    hh64 = hh.detach().cpu().double()
    phi, factorial, b_list = torch.expm1(hh64) / hh64 - 1, 1, []
    for i in range(1, k + 1):
        b_list.append(phi * factorial / hh64)
        factorial *= i + 1
        phi = phi / hh64 - 1 / factorial
    matrix = torch.stack([rks ** (i - 1) for i in range(1, k + 1)])
    b = torch.tensor([float(v) for v in b_list], dtype=rks.dtype, device=rks.device)
    alpha_t = _vp_alpha(t)
    base = _vp_std(t) / _vp_std(at[-1]) * x - alpha_t * torch.expm1(hh) * newest
    predicted = base
    if diffs:
        rhos = torch.tensor([0.5]) if k == 2 else torch.linalg.solve(matrix[:-1, :-1], b[:-1])
        predicted = base - alpha_t * hh * sum(float(r) * d for r, d in zip(rhos, diffs, strict=True))
    if not corrector:
        return predicted, None
    estimate = data(predicted, t)
    rhos_c = torch.tensor([0.5]) if k == 1 else torch.linalg.solve(matrix, b)
    correction = sum((float(r) * d for r, d in zip(rhos_c[:-1], diffs, strict=True)), torch.zeros_like(x))
    return base - alpha_t * hh * (correction + float(rhos_c[-1]) * (estimate - newest)), estimate


_DETERMINISTIC = {"euler": _euler, "heun": _heun, "dpm_2": _dpm_2, "lms": _lms, "dpmpp_2m": _dpmpp_2m}
_STOCHASTIC = {"euler_ancestral": _euler_ancestral, "dpm_2_ancestral": _dpm_2_ancestral, "lcm": _lcm}
