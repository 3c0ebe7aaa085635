"""Sampling maths (nodes.engine.sigmas, nodes.engine.samplers) on analytic problems: pure tensor code, no model, no hub.

The main problem is Gaussian data x0 ~ N(MU, C²) per element, whose exact denoiser is known in closed form:
D(x, sigma) = MU + C² / (C² + sigma²) · (x - MU). Started from the exact marginal at sigma_0,
x = MU + sqrt(C² + sigma_0²) · n, the probability-flow ODE ends exactly at MU + C · n, and stochastic samplers
end with samples of N(MU, C²).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from scipy import special

from nodes.engine import samplers as smp
from nodes.engine.inpainting import MaskedDenoiser, blend_noise
from nodes.engine.sigmas import (
    SCHEDULERS,
    DiscreteModel,
    initial_noise,
    noised_latent,
    schedule,
    sigma_slice,
    sigmas,
)

SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "prediction_type": "epsilon"}
MU, C = 0.5, 0.5
DETERMINISTIC = ("euler", "heun", "dpm_2", "lms", "dpmpp_2m", "ddim", "uni_pc")
HIGHER_ORDER = ("heun", "dpm_2", "lms", "dpmpp_2m", "uni_pc")
STOCHASTIC = ("euler_ancestral", "dpm_2_ancestral", "dpmpp_sde", "dpmpp_2m_sde")


@pytest.fixture(scope="module")
def model() -> DiscreteModel:
    return DiscreteModel.from_config(SD15)


def reference_sigmas() -> np.ndarray:
    """SD1.5's training sigmas, computed here in float64 from the betas."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def interp_sigma(t: float) -> float:
    return float(np.exp(np.interp(t, np.arange(1000), np.log(reference_sigmas()))))


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return MU + C * C / (C * C + sigma * sigma) * (x - MU)


def run_gaussian(name: str, model: DiscreteModel, steps: int, scheduler: str = "karras",
                 shape: tuple[int, ...] = (1, 4, 16, 16), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    s = sigmas(scheduler, model, steps, sampler=name)
    n = initial_noise(1234, shape)
    x = MU + (C * C + s[0] ** 2) ** 0.5 * n
    return smp.sample(name, gaussian_denoiser, x, s, seed=seed), MU + C * n


# --- the discrete model -------------------------------------------------------------------------------------

def test_training_sigmas_follow_the_betas(model: DiscreteModel) -> None:
    assert model.sigmas.dtype == torch.float32 and len(model.sigmas) == 1000
    np.testing.assert_allclose(model.sigmas.numpy(), reference_sigmas(), rtol=1e-6)
    assert float(model.sigma_max) == pytest.approx(14.6146, abs=1e-4)
    assert float(model.sigma_min) == pytest.approx(0.0291672, abs=1e-6)


def test_timestep_is_the_nearest_index_in_log_sigma(model: DiscreteModel) -> None:
    ref = reference_sigmas()
    # Just below the geometric midpoint of sigmas 500 and 501 is 500; just above it is 501.
    mid = math.sqrt(ref[500] * ref[501])
    assert model.timestep(torch.tensor([mid * 0.9999, mid * 1.0001])).tolist() == [500, 501]
    assert int(model.timestep(torch.tensor(100.0))) == 999 and int(model.timestep(torch.tensor(1e-3))) == 0


def test_sigma_interpolates_log_sigma_at_fractional_timesteps(model: DiscreteModel) -> None:
    for t in (0.0, 0.25, 411.5, 998.9, 999.0):
        assert float(model.sigma(torch.tensor(t))) == pytest.approx(interp_sigma(t), rel=1e-5)


def test_linear_betas_and_v_prediction_from_config() -> None:
    m = DiscreteModel.from_config({**SD15, "beta_schedule": "linear", "prediction_type": "v_prediction"})
    betas = np.linspace(0.00085, 0.012, 1000)
    ac = np.cumprod(1 - betas)
    np.testing.assert_allclose(m.sigmas.numpy(), np.sqrt((1 - ac) / ac), rtol=1e-6)
    assert m.prediction == "v_prediction"


@pytest.mark.parametrize("bad, words", [({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
                                        ({"prediction_type": "sample"}, "prediction_type"),
                                        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr")])
def test_unsupported_configs_are_named(bad: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        DiscreteModel.from_config({**SD15, **bad})


# --- schedules ---------------------------------------------------------------------------------------------

def test_normal_spaces_timesteps_linearly_from_t_max_to_t_min(model: DiscreteModel) -> None:
    s = schedule("normal", model, 20)
    assert len(s) == 21 and float(s[-1]) == 0.0
    assert float(s[0]) == pytest.approx(14.6146, abs=1e-4)
    assert float(s[-2]) == pytest.approx(float(model.sigma_min), rel=1e-6)  # t_min = 0
    expected = [interp_sigma(t) for t in np.linspace(999, 0, 20)]
    np.testing.assert_allclose(s[:-1].numpy(), expected, rtol=2e-5)


def test_sgm_uniform_spaces_steps_plus_one_and_drops_the_last(model: DiscreteModel) -> None:
    s = schedule("sgm_uniform", model, 10)
    expected = [interp_sigma(t) for t in np.linspace(999, 0, 11)[:-1]]
    np.testing.assert_allclose(s[:-1].numpy(), expected, rtol=2e-5)
    assert len(s) == 11 and float(s[-1]) == 0.0


def test_karras_and_exponential_use_the_models_sigma_range(model: DiscreteModel) -> None:
    lo, hi, rho = float(model.sigma_min), float(model.sigma_max), 7.0
    ramp = np.linspace(0, 1, 15)
    karras = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    np.testing.assert_allclose(schedule("karras", model, 15)[:-1].numpy(), karras, rtol=1e-5)
    np.testing.assert_allclose(schedule("exponential", model, 15)[:-1].numpy(), np.geomspace(hi, lo, 15), rtol=1e-5)


def test_simple_and_ddim_uniform_pick_training_sigmas(model: DiscreteModel) -> None:
    ref = reference_sigmas()
    simple = [ref[-(1 + int(i * 1000 / 7))] for i in range(7)]  # a stride that is not whole
    np.testing.assert_allclose(schedule("simple", model, 7)[:-1].numpy(), simple, rtol=1e-6)
    np.testing.assert_allclose(schedule("ddim_uniform", model, 20)[:-1].numpy(), ref[1::50][::-1], rtol=1e-6)
    # 1000 // 30 = 33 does not divide 999: ComfyUI's ddim_uniform then runs one step more than asked.
    assert len(schedule("ddim_uniform", model, 30)) == 32


def test_beta_schedule_takes_the_beta_quantiles_and_drops_repeats(model: DiscreteModel) -> None:
    ref = reference_sigmas()
    q = 1 - np.arange(12) / 12
    ts = np.rint(special.betaincinv(0.6, 0.6, q) * 999).astype(int)
    np.testing.assert_allclose(schedule("beta", model, 12)[:-1].numpy(), ref[ts], rtol=1e-6)
    many = schedule("beta", model, 400)  # the U-shaped density repeats timesteps at both ends
    assert len(many) < 401 and bool((many[:-1] > many[1:]).all())


def test_every_schedule_ends_at_zero_and_decreases(model: DiscreteModel) -> None:
    for name in SCHEDULERS:
        s = schedule(name, model, 9)
        assert float(s[-1]) == 0.0 and bool((s[:-1] > s[1:]).all()), name


def test_denoise_keeps_the_tail_of_a_longer_schedule(model: DiscreteModel) -> None:
    assert torch.equal(sigmas("normal", model, 10, denoise=0.5), schedule("normal", model, 20)[-11:])
    assert torch.equal(sigmas("karras", model, 6, denoise=0.7), schedule("karras", model, 8)[-7:])  # int(8.57)
    assert len(sigmas("normal", model, 10, denoise=0.0)) == 0


def test_dpm_2_and_uni_pc_drop_the_penultimate_sigma(model: DiscreteModel) -> None:
    longer = schedule("karras", model, 11)
    expected = torch.cat([longer[:-2], longer[-1:]])
    for name in ("dpm_2", "dpm_2_ancestral", "uni_pc"):
        assert torch.equal(sigmas("karras", model, 10, sampler=name), expected)
    assert torch.equal(sigmas("karras", model, 10, sampler="euler"), schedule("karras", model, 10))


def test_bad_schedule_arguments_are_named(model: DiscreteModel) -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'linear'"):
        schedule("linear", model, 10)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        schedule("normal", model, 0)
    with pytest.raises(ValueError, match="unknown sampler 'dpmpp_3m'"):
        smp.sample("dpmpp_3m", gaussian_denoiser, torch.zeros(1), torch.tensor([1.0, 0.0]), seed=0)


# --- starting and slicing ----------------------------------------------------------------------------------

def test_initial_noise_is_the_seeds_cpu_float32_randn() -> None:
    noise = initial_noise(42, (2, 4, 8, 8))
    assert noise.device.type == "cpu" and noise.dtype == torch.float32
    assert torch.equal(noise, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(42)))


def test_noised_latent_scales_by_sqrt_one_plus_sigma_squared_from_the_top(model: DiscreteModel) -> None:
    latent, noise = torch.full((1, 4, 2, 2), 0.3), initial_noise(0, (1, 4, 2, 2))
    full = schedule("normal", model, 10)
    top = float(full[0])
    assert torch.allclose(noised_latent(model, latent, noise, full), latent + noise * math.sqrt(1 + top ** 2))
    partial = sigmas("normal", model, 10, denoise=0.5)
    assert torch.allclose(noised_latent(model, latent, noise, partial), latent + noise * float(partial[0]))


def test_sigma_slice_follows_ksampler_advanced(model: DiscreteModel) -> None:
    s = schedule("normal", model, 10)
    assert torch.equal(sigma_slice(s, 3, 10000, leftover=False), s[3:])
    assert torch.equal(sigma_slice(s, 0, 4, leftover=True), s[:5])
    cut = sigma_slice(s, 0, 4, leftover=False)
    assert torch.equal(cut[:-1], s[:4]) and float(cut[-1]) == 0.0 and float(s[4]) > 0  # the input is untouched
    empty = sigma_slice(s, 10, 10000, leftover=False)
    assert len(empty) == 0
    latent = torch.ones(1, 4, 2, 2)
    assert torch.equal(noised_latent(model, latent, initial_noise(0, (1, 4, 2, 2)), empty), latent)
    assert torch.equal(smp.sample("euler", gaussian_denoiser, latent, empty, seed=0), latent)


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_two_halves_of_an_advanced_split_equal_one_run(model: DiscreteModel, name: str) -> None:
    s = schedule("karras", model, 12)
    x = MU + (C * C + s[0] ** 2) ** 0.5 * initial_noise(5, (1, 4, 8, 8))
    full = smp.sample(name, gaussian_denoiser, x, s, seed=0)
    first = smp.sample(name, gaussian_denoiser, x, sigma_slice(s, 0, 5, leftover=True), seed=0)
    second = smp.sample(name, gaussian_denoiser, first, sigma_slice(s, 5, 10000, leftover=False), seed=0)
    assert torch.equal(second, full)
    early = smp.sample(name, gaussian_denoiser, x, sigma_slice(s, 0, 5, leftover=False), seed=0)
    assert not torch.allclose(early, first)  # stopping without leftover noise denoises fully


# --- samplers on the analytic problem ------------------------------------------------------------------------

@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge_to_the_ode_solution(model: DiscreteModel, name: str) -> None:
    errors = []
    for steps in (6, 20, 80):
        out, exact = run_gaussian(name, model, steps)
        errors.append(float((out - exact).abs().max()))
    assert errors[2] < errors[1] < errors[0] or errors[2] < errors[0] / 10, errors
    assert errors[2] < (0.05 if name in ("euler", "ddim") else 0.005), errors


def ode_error(name: str, model: DiscreteModel, steps: int) -> float:
    """Max error against the exact ODE solution on a schedule stopping at sigma_min (no final jump to 0)."""
    s = schedule("karras", model, steps)[:-1]
    n = initial_noise(1234, (1, 4, 16, 16))
    out = smp.sample(name, gaussian_denoiser, MU + (C * C + s[0] ** 2) ** 0.5 * n, s, seed=0)
    return float((out - (MU + (C * C + s[-1] ** 2) ** 0.5 * n)).abs().max())


@pytest.mark.parametrize("steps", [10, 30])
def test_higher_order_samplers_beat_euler_at_equal_steps(model: DiscreteModel, steps: int) -> None:
    euler, exact = run_gaussian("euler", model, steps)
    euler_error = float((euler - exact).abs().max())
    for name in HIGHER_ORDER:
        out, _ = run_gaussian(name, model, steps)
        assert float((out - exact).abs().max()) < euler_error / 2, name


def test_samplers_have_their_order_of_accuracy(model: DiscreteModel) -> None:
    # Doubling the steps divides the error by about 2^order.
    assert 1.8 < ode_error("euler", model, 10) / ode_error("euler", model, 20) < 2.2
    for name in ("heun", "dpm_2", "dpmpp_2m", "lms"):
        assert ode_error(name, model, 20) / ode_error(name, model, 40) > 3.3, name
    # UniPC's corrector lifts its multistep order 2 to 3: far below the second-order samplers.
    assert ode_error("uni_pc", model, 20) < 1e-3 < ode_error("dpmpp_2m", model, 20) / 20


@pytest.mark.parametrize("name, tolerance", [("euler_ancestral", 0.03), ("dpm_2_ancestral", 0.01),
                                             ("dpmpp_sde", 0.012), ("dpmpp_2m_sde", 0.05)])
def test_stochastic_samplers_converge_to_the_data_distribution(model: DiscreteModel, name: str,
                                                               tolerance: float) -> None:
    gaps = []
    for steps in (8, 100):  # 16384 samples of N(MU, C²): the std's standard error is about 0.003
        out, _ = run_gaussian(name, model, steps, scheduler="normal", shape=(1, 4, 64, 64), seed=3)
        assert abs(float(out.mean()) - MU) < 0.01, (name, steps)
        gaps.append(abs(float(out.std()) - C))
    assert gaps[1] < gaps[0] and gaps[1] < tolerance, gaps


def test_lcm_lands_on_a_consistency_models_answer_and_renoises_with_the_seed(model: DiscreteModel) -> None:
    s = schedule("normal", model, 4)
    x = initial_noise(0, (1, 4, 8, 8)) * s[0]
    seen: list[torch.Tensor] = []

    def point(x_: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # data is the single point MU
        seen.append(x_)
        return torch.full_like(x_, MU)

    assert torch.allclose(smp.sample("lcm", point, x, s, seed=9), torch.full_like(x, MU))
    # Between steps the estimate is re-noised to the next sigma with the sampler noise of seed 9.
    first_draw = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(10))
    assert torch.allclose(seen[1], MU + first_draw * s[1])


# --- inpainting (noise mask) ------------------------------------------------------------------------------

def test_masked_denoiser_repaints_only_inside_the_mask() -> None:
    """x_in = m·x + (1 - m)·(latent + sigma·noise), D_out = m·D(x_in) + (1 - m)·latent, with a soft edge too."""
    mask = torch.tensor([[[[1.0, 0.0], [0.25, 1.0]]]])
    latent, noise = torch.full((1, 4, 2, 2), 0.3), initial_noise(0, (1, 4, 2, 2))
    x, sigma = initial_noise(1, (1, 4, 2, 2)) * 5, torch.tensor(2.0)
    seen: list[torch.Tensor] = []

    def record(x_in: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        seen.append(x_in)
        return x_in * 0.5

    out = MaskedDenoiser(record, mask, latent, noise)(x, sigma)
    x_in = mask * x + (1 - mask) * (latent + 2.0 * noise)
    assert torch.allclose(seen[0], x_in)
    assert torch.allclose(out, mask * x_in * 0.5 + (1 - mask) * latent)
    assert torch.equal(out[..., 0, 1], latent[..., 0, 1]) and torch.equal(seen[0][..., 0, 0], x[..., 0, 0])


def test_ddim_renoises_the_kept_region_with_its_own_draw_from_seed_plus_one() -> None:
    noise = initial_noise(7, (1, 4, 3, 3))
    for name in ("euler", "euler_ancestral", "dpmpp_2m"):
        assert blend_noise(name, noise, 7) is noise
    own = blend_noise("ddim", torch.zeros_like(noise), 7)  # drawn even when KSamplerAdvanced adds no noise
    assert torch.equal(own, torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(8)))


def test_the_largest_seed_wraps_to_zero_for_noise_drawn_during_sampling() -> None:
    x = torch.zeros(1, 4, 2, 2)
    zero_draw = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(smp.gaussian_noise(x, 2**64 - 1)(torch.tensor(1.0), torch.tensor(0.5)), zero_draw)
    assert torch.equal(blend_noise("ddim", x, 2**64 - 1), zero_draw)


# --- noise ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["euler_ancestral", "dpm_2_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "lcm"])
def test_noise_inside_samplers_follows_the_seed(model: DiscreteModel, name: str) -> None:
    a, _ = run_gaussian(name, model, 6, seed=1)
    b, _ = run_gaussian(name, model, 6, seed=1)
    c, _ = run_gaussian(name, model, 6, seed=2)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_sampler_noise_is_drawn_on_the_cpu_in_float32(model: DiscreteModel, monkeypatch: pytest.MonkeyPatch) -> None:
    draws: list[tuple[str, torch.dtype]] = []
    real = torch.randn

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        generator = kwargs.get("generator")
        draws.append((generator.device.type if generator is not None else "global", kwargs.get("dtype")))
        return real(*args, **kwargs)

    s = schedule("karras", model, 4)
    x = (initial_noise(0, (1, 4, 8, 8)) * s[0]).double()  # a latent of another dtype than the noise
    monkeypatch.setattr(torch, "randn", recording)
    out = smp.sample("euler_ancestral", gaussian_denoiser, x, s, seed=7)
    monkeypatch.undo()
    assert len(draws) == 3 and all(d == ("cpu", torch.float32) for d in draws), draws  # no noise into sigma 0
    assert out.dtype == torch.float64
    # One step: the first draw is the CPU generator's first randn for seed + 1 (ComfyUI's CPU rule).
    s0, s1 = float(s[0]), float(s[1])
    up = math.sqrt(s1 ** 2 * (s0 ** 2 - s1 ** 2) / s0 ** 2)  # eta 1: the step's noise, and the rest is deterministic
    down = math.sqrt(s1 ** 2 - up ** 2)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8)).double()
    expected = x + (x - gaussian_denoiser(x, s[0])) / s0 * (down - s0) + noise * up
    assert torch.allclose(smp.sample("euler_ancestral", gaussian_denoiser, x, s[:2], seed=7), expected, atol=1e-5)


def test_brownian_noise_has_unit_variance_and_refines_one_path() -> None:
    x = torch.zeros(1, 4, 32, 32)
    s = torch.tensor([10.0, 5.0, 1.0, 0.0])
    noise = smp.brownian_noise(x, s, seed=3)
    step = noise(s[0], s[1])
    assert abs(float(step.std()) - 1) < 0.05
    # W(1) - W(10) is the sum of the increments over [5, 10] and [1, 5]: the same path, whatever the steps.
    halves = noise(s[0], s[1]) * math.sqrt(5.0) + noise(s[1], s[2]) * math.sqrt(4.0)
    assert torch.allclose(noise(s[0], s[2]) * math.sqrt(9.0), halves, atol=1e-4)
    assert torch.equal(smp.brownian_noise(x, s, seed=3)(s[0], s[1]), step)
    assert torch.equal(noise(s[1], s[0]), -step)  # the increment W(sigma_next) - W(sigma), signed


# --- the CFG denoiser ----------------------------------------------------------------------------------------

class CountingModel:
    """A toy eps model: eps = 0.1 · x_in + the conditioning's bias, recording each call's batch."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.timesteps: list[torch.Tensor] = []

    def __call__(self, x_in: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        self.batches.append(x_in.shape[0])
        self.timesteps.append(timestep)
        return 0.1 * x_in + cond["bias"].view(-1, 1, 1, 1)


def test_cfg_one_makes_one_unbatched_call_per_step(model: DiscreteModel) -> None:
    eps = CountingModel()
    cond, uncond = {"bias": torch.tensor([1.0, 2.0])}, {"bias": torch.tensor([0.0, 0.0])}
    s = schedule("normal", model, 5)
    smp.sample("euler", smp.CFGDenoiser(model, eps, cond, uncond, cfg=1.0), torch.ones(2, 4, 4, 4), s, seed=0)
    assert eps.batches == [2] * 5


def test_cfg_makes_one_batched_call_and_mixes_the_estimates(model: DiscreteModel) -> None:
    eps = CountingModel()
    cond, uncond = {"bias": torch.tensor([1.0, 2.0])}, {"bias": torch.tensor([0.0, 0.5])}
    denoiser = smp.CFGDenoiser(model, eps, cond, uncond, cfg=7.5)
    s = schedule("normal", model, 5)
    x = torch.ones(2, 4, 4, 4)
    smp.sample("euler", denoiser, x, s, seed=0)
    assert eps.batches == [4] * 5
    sigma = s[2]
    with_cond = smp.CFGDenoiser(model, eps, cond)(x, sigma)
    without = smp.CFGDenoiser(model, eps, uncond)(x, sigma)
    assert torch.allclose(denoiser(x, sigma), without + 7.5 * (with_cond - without), atol=1e-5)


def test_conditioning_that_cannot_be_batched_runs_as_two_calls(model: DiscreteModel) -> None:
    eps = CountingModel()
    cond = {"bias": torch.tensor([1.0]), "extra": torch.zeros(1, 3)}
    uncond = {"bias": torch.tensor([0.0]), "extra": torch.zeros(1, 5)}  # e.g. prompts of other token lengths
    smp.CFGDenoiser(model, eps, cond, uncond, cfg=5.0)(torch.ones(1, 4, 2, 2), torch.tensor(3.0))
    assert eps.batches == [1, 1]


def test_concat_conds_joins_tensors_and_nested_dicts_and_keeps_equal_values() -> None:
    a = {"emb": torch.zeros(1, 2), "added": {"time_ids": torch.zeros(1, 6)}, "scale": 0.5}
    b = {"emb": torch.ones(1, 2), "added": {"time_ids": torch.ones(1, 6)}, "scale": 0.5}
    both = smp.concat_conds([a, b])
    assert both is not None and both["emb"].shape == (2, 2) and both["added"]["time_ids"].shape == (2, 6)
    assert both["scale"] == 0.5
    assert smp.concat_conds([a, {**b, "scale": 0.7}]) is None


def test_denoiser_scales_the_input_and_passes_the_quantised_timestep(model: DiscreteModel) -> None:
    eps = CountingModel()
    sigma = model.sigmas[300] * 1.001
    x = torch.full((1, 4, 2, 2), 2.0)
    out = smp.CFGDenoiser(model, eps, {"bias": torch.tensor([0.0])})(x, sigma)
    assert eps.timesteps[0].tolist() == [300.0]
    x_in = x / math.sqrt(float(sigma) ** 2 + 1)
    assert torch.allclose(out, x - 0.1 * x_in * sigma)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_denoiser_recovers_the_data_from_an_exact_eps_or_v(prediction: str) -> None:
    m = DiscreteModel.from_config({**SD15, "prediction_type": prediction})
    data, n, sigma = torch.full((1, 4, 2, 2), 0.7), initial_noise(1, (1, 4, 2, 2)), torch.tensor(2.5)
    x = data + sigma * n
    alpha, sigma_vp = 1 / math.sqrt(1 + 6.25), 2.5 / math.sqrt(1 + 6.25)

    def exact(x_in: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return n if prediction == "epsilon" else alpha * n - sigma_vp * data

    assert torch.allclose(smp.CFGDenoiser(m, exact, {})(x, sigma), data, atol=1e-5)


# --- callbacks, cancellation and diffusers ---------------------------------------------------------------------

@pytest.mark.parametrize("name", smp.SAMPLERS)
def test_callback_follows_every_step_and_cancel_precedes_every_model_call(model: DiscreteModel, name: str) -> None:
    s = sigmas("karras", model, 5, sampler=name)
    steps: list[tuple[int, int]] = []
    calls: list[int] = []

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        calls.append(len(checks))
        return gaussian_denoiser(x, sigma)

    checks: list[int] = []
    x = initial_noise(0, (1, 4, 4, 4)) * s[0]
    smp.sample(name, denoiser, x, s, seed=0, callback=lambda i, n, x_, d: steps.append((i, n)),
               cancel_check=lambda: checks.append(1))
    assert steps == [(i, len(s) - 1) for i in range(len(s) - 1)]
    assert calls == list(range(1, len(calls) + 1))  # each call came right after a check

    class Stop(Exception):
        pass

    def stop() -> None:
        raise Stop

    with pytest.raises(Stop):
        smp.sample(name, denoiser, x, s, seed=0, cancel_check=stop)


def test_euler_equals_diffusers_euler_discrete_on_the_same_sigmas(model: DiscreteModel) -> None:
    from diffusers import EulerDiscreteScheduler

    def toy(x_in: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x_in) * 0.5 + 0.1 * x_in

    s = schedule("karras", model, 12)
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SD15.items()})
    scheduler.set_timesteps(sigmas=s.tolist())
    x = initial_noise(3, (1, 4, 8, 8)) * s[0]
    ours = smp.sample("euler", smp.CFGDenoiser(model, lambda x_in, t, c: toy(x_in), {}), x, s, seed=0)
    theirs = x
    for t in scheduler.timesteps:
        theirs = scheduler.step(toy(scheduler.scale_model_input(theirs, t)), t, theirs).prev_sample
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert float((ours - theirs).abs().max()) < 1e-4
