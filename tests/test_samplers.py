"""Samplers against closed-form denoisers (a point mass and a Gaussian data distribution), against diffusers'
DDIMScheduler, and against each other (batched = one by one, 1000-step solvers = 1000-step DDIM)."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from ldm.models.diffusion.samplers import (
    SAMPLERS, DDIMSampler, DDPMSampler, SamplerSettings, ddim_timesteps, make_sampler, sample_loop, schedule_betas,
    spaced_timesteps,
)
from ldm.modules.diffusionmodules.util import make_beta_schedule

ALPHAS_CUMPROD = torch.from_numpy(np.cumprod(1 - make_beta_schedule("linear", 1000, 0.0015, 0.0195)))
NAMES = tuple(SAMPLERS)


def point_mass_denoiser(target: torch.Tensor):
    """Exact noise prediction when all data equal ``target``: eps = (x - sqrt(a) x0) / sqrt(1 - a)."""

    def denoise(x, t):
        alpha = ALPHAS_CUMPROD[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return (x - alpha.sqrt() * target.to(x.dtype)) / (1 - alpha).sqrt()

    return denoise


def gaussian_denoiser(mean: float, std: float):
    """Exact E[eps | x_t] for data ~ N(mean, std^2): sqrt(1-a) (x - sqrt(a) mean) / (a std^2 + 1 - a)."""

    def denoise(x, t):
        alpha = ALPHAS_CUMPROD[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return (1 - alpha).sqrt() * (x - alpha.sqrt() * mean) / (alpha * std**2 + 1 - alpha)

    return denoise


def sampler(name: str, eta: float = 1.0, spacing: str | None = None):
    return make_sampler(SamplerSettings(name, eta=eta, spacing=spacing), ALPHAS_CUMPROD)


def test_ddim_timesteps_match_the_original_and_work_for_any_count():
    np.testing.assert_array_equal(ddim_timesteps(200, 1000), np.arange(1, 1000, 5))
    for count in (1, 3, 7, 50, 333, 999, 1000):
        steps = ddim_timesteps(count, 1000)
        assert len(steps) == count == len(set(steps.tolist()))
        assert steps.min() >= 0 and steps.max() <= 999
    with pytest.raises(ValueError, match="1..1000"):
        ddim_timesteps(1001, 1000)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_spacings_of_ddim_equal_diffusers_and_every_sampler_starts_where_its_spacing_says(spacing):
    for count in (1, 3, 10, 20, 25, 50, 200):
        reference = DPMSolverMultistepScheduler(timestep_spacing=spacing)
        reference.set_timesteps(count)
        np.testing.assert_array_equal(spaced_timesteps(count, 1000, spacing)[::-1], reference.timesteps.numpy())
        for name in NAMES:
            assert sampler(name, spacing=spacing).set_timesteps(count)[0] == 999
    assert spaced_timesteps(4, 1000, "original").tolist() == [1, 251, 501, 751]
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        spaced_timesteps(4, 1000, "karras")


@pytest.mark.parametrize("name", NAMES)
def test_point_mass_is_recovered(name):
    target = torch.linspace(-0.5, 1.5, 24, dtype=torch.float64).reshape(1, 1, 2, 3, 4)
    result = sample_loop(sampler(name, eta=0.0), point_mass_denoiser(target), target.shape, 25,
                         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(result.double(), target, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("name", "eta", "steps", "tolerance"), [
    ("ddim", 1.0, 1000, 0.05),
    ("ddpm", 1.0, 1000, 0.05),
    ("ddim", 0.0, 100, 0.08),
    ("dpmpp_2m", 1.0, 10, 0.02),
    ("unipc", 1.0, 10, 0.04),
    ("dpmpp_2m_sde", 1.0, 20, 0.05),
], ids=["ddim-eta1", "ddpm", "ddim-eta0", "dpmpp_2m", "unipc", "dpmpp_2m_sde"])
def test_gaussian_data_statistics_are_reproduced(name, eta, steps, tolerance):
    """With the exact denoiser the samples follow the data law; ancestral sampling with the fixed (small) posterior
    variance under-disperses with few steps (std 0.26 instead of 0.30 at 100 steps), hence 1000 steps there; the
    second-order solvers with their Karras spacing get the spread within 2-4 % in 10 steps (DDIM: 0.20)."""
    mean, std = 0.7, 0.3
    samples = sample_loop(sampler(name, eta=eta), gaussian_denoiser(mean, std), (20000, 1), steps,
                          generator=torch.Generator().manual_seed(1))
    assert float(samples.mean()) == pytest.approx(mean, abs=0.01)
    assert float(samples.std()) == pytest.approx(std, rel=tolerance)


def test_ddim_with_eta_one_is_ancestral_ddpm():
    denoise = gaussian_denoiser(0.2, 0.5)
    ddim = sample_loop(DDIMSampler(ALPHAS_CUMPROD, eta=1.0), denoise, (64, 1), 40,
                       generator=torch.Generator().manual_seed(4))
    ddpm = sample_loop(DDPMSampler(ALPHAS_CUMPROD), denoise, (64, 1), 40, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=1e-4)


def diffusers_ddim(denoise, shape, steps: int, eta: float, seed: int) -> torch.Tensor:
    """diffusers' DDIMScheduler set up as the original sampler: the model's betas, ``leading`` timesteps with offset
    1 (``1, 6, ..., 996``), no clipping, and a last step to clean data (``set_alpha_to_one``)."""
    scheduler = DDIMScheduler(num_train_timesteps=1000, trained_betas=schedule_betas(ALPHAS_CUMPROD),
                              clip_sample=False, set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float32)
    for t in scheduler.timesteps:
        x = scheduler.step(denoise(x, t.repeat(shape[0])), t, x, eta=eta, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [10, 50, 200])
def test_ddim_equals_diffusers_ddim_configured_as_the_original(steps, eta):
    denoise = gaussian_denoiser(0.3, 0.6)
    ours = sample_loop(DDIMSampler(ALPHAS_CUMPROD, eta=eta), denoise, (256, 1), steps,
                       generator=torch.Generator().manual_seed(9))
    theirs = diffusers_ddim(denoise, (256, 1), steps, eta, seed=9)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)


def test_ddim_at_every_training_step_is_where_diffusers_leading_spacing_runs_out_of_range():
    """At ``steps == T`` the original spacing with offset 1 would index ``T``: ours drops the offset, diffusers
    asks for ``alphas_cumprod[1000]``."""
    assert ddim_timesteps(1000, 1000)[-1] == 999
    with pytest.raises(IndexError):
        diffusers_ddim(gaussian_denoiser(0.0, 1.0), (4, 1), 1000, 0.0, seed=0)


@pytest.mark.parametrize("spacing", ["trailing", "karras"])
@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_deterministic_solvers_at_1000_steps_match_ddim_eta0_at_1000_steps(name, spacing):
    """Both discretise the same probability-flow ODE from the same noise: at 1000 steps they agree within 0.01 on
    data of std 0.6 (measured 0.0072-0.0079), and the solver is the closer to the exact ODE solution (for Gaussian
    data ``x_0 = mean + std (x_T - sqrt(abar_T) mean) / sqrt(abar_T std^2 + 1 - abar_T)``; DDIM 0.0117 off, the
    solvers 0.0038-0.0045)."""
    mean, std = 0.3, 0.6
    denoise = gaussian_denoiser(mean, std)
    start = torch.randn((2000, 1), generator=torch.Generator().manual_seed(2))
    alpha = float(ALPHAS_CUMPROD[-1])
    exact = mean + std * (start - alpha**0.5 * mean) / (alpha * std**2 + 1 - alpha) ** 0.5
    ddim = sample_loop(DDIMSampler(ALPHAS_CUMPROD, eta=0.0), denoise, (2000, 1), 1000,
                       generator=torch.Generator().manual_seed(2))
    solver = sample_loop(sampler(name, spacing=spacing), denoise, (2000, 1), 1000,
                         generator=torch.Generator().manual_seed(2))
    assert float((ddim - solver).abs().max()) < 0.01
    assert float((solver - exact).abs().max()) < 0.6 * float((ddim - exact).abs().max())


@pytest.mark.parametrize("name", NAMES)
def test_batched_with_one_generator_per_item_equals_one_by_one(name):
    denoise = gaussian_denoiser(0.1, 0.8)
    seeds = (3, 4, 5)
    batched = sample_loop(sampler(name), denoise, (3, 1, 4, 4, 4), 12,
                          generator=[torch.Generator().manual_seed(seed) for seed in seeds])
    for row, seed in enumerate(seeds):
        alone = sample_loop(sampler(name), denoise, (1, 1, 4, 4, 4), 12, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(batched[row:row + 1], alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_same_generator_same_sample_and_new_seed_new_sample(name):
    denoise = gaussian_denoiser(0.0, 1.0)
    draw = lambda seed: sample_loop(sampler(name), denoise, (2, 1, 4, 4, 4), 10,
                                    generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(5), draw(5))
    assert not torch.allclose(draw(5), draw(6))


@pytest.mark.parametrize("blend", ["clean", "renoise"])
@pytest.mark.parametrize("name", NAMES)
def test_inpainting_keeps_the_known_region_and_fills_the_rest(name, blend):
    """Known region exact; with a point-mass denoiser the unknown region becomes the target."""
    known = torch.randn(1, 4, 6, 6, 6, generator=torch.Generator().manual_seed(2))
    target = torch.full_like(known, 0.5)
    mask = torch.zeros(1, 1, 6, 6, 6)
    mask[..., 2:4, 1:5, 2:5] = 1
    result = sample_loop(sampler(name, eta=0.0), point_mass_denoiser(target), known.shape, 20,
                         generator=torch.Generator().manual_seed(3), known=known, mask=mask, blend=blend)
    outside = (mask == 0).expand_as(known)
    assert torch.equal(result[outside], known[outside])
    torch.testing.assert_close(result[~outside], target[~outside], atol=1e-4, rtol=0)


def test_multistep_solvers_refuse_steps_out_of_order():
    solver = sampler("dpmpp_2m")
    solver.set_timesteps(5)
    x = torch.randn(2, 1)
    solver.step(torch.zeros_like(x), 0, x)
    with pytest.raises(ValueError, match="in order"):
        solver.step(torch.zeros_like(x), 2, x)


def test_settings_and_add_noise_check_their_arguments():
    x0, noise = torch.ones(3), torch.full((3,), 2.0)
    alpha = float(ALPHAS_CUMPROD[500])
    for name in NAMES:
        torch.testing.assert_close(sampler(name).add_noise(x0, noise, 500),
                                   torch.full((3,), alpha**0.5 + 2 * (1 - alpha) ** 0.5))
    assert SamplerSettings().resolved_spacing == "original"
    assert SamplerSettings("unipc").resolved_spacing == "karras"
    with pytest.raises(ValueError, match="unknown sampler 'plms'; choose one of ddim, ddpm, dpmpp_2m"):
        SamplerSettings("plms")
    with pytest.raises(ValueError, match="karras or lu or linspace or trailing, not 'original'"):
        SamplerSettings("dpmpp_2m", spacing="original")
    with pytest.raises(ValueError, match="1..1000"):
        sampler("unipc").set_timesteps(0)
    with pytest.raises(ValueError, match="needs both"):
        sample_loop(sampler("ddim"), gaussian_denoiser(0, 1), (1, 1), 2, known=torch.zeros(1, 1))


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_karras_spacing_beats_uniform_timesteps_at_few_steps(name):
    """The reason the fast solvers default to ``karras``: at 10 steps uniform timesteps leave the Gaussian's spread
    at about 0.16 of 0.30 (a long last step from t = 100 to clean data), Karras noise levels within 4 %."""
    spread = {spacing: float(sample_loop(sampler(name, spacing=spacing), gaussian_denoiser(0.7, 0.3), (20000, 1), 10,
                                         generator=torch.Generator().manual_seed(1)).std())
              for spacing in ("karras", "linspace")}
    assert abs(spread["karras"] - 0.3) < 0.012 < 0.1 < abs(spread["linspace"] - 0.3)
