"""Samplers against closed-form denoisers: a point mass and a Gaussian data distribution."""
import numpy as np
import pytest
import torch

from ldm.models.diffusion.samplers import DDIMSampler, DDPMSampler, ddim_timesteps, make_sampler, sample_loop
from ldm.modules.diffusionmodules.util import make_beta_schedule

ALPHAS_CUMPROD = torch.from_numpy(np.cumprod(1 - make_beta_schedule("linear", 1000, 0.0015, 0.0195)))


def point_mass_denoiser(target: torch.Tensor):
    """Exact noise prediction when all data equal ``target``: eps = (x - sqrt(a) x0) / sqrt(1 - a)."""

    def denoise(x, t):
        alpha = ALPHAS_CUMPROD[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return (x - alpha.sqrt() * target) / (1 - alpha).sqrt()

    return denoise


def gaussian_denoiser(mean: float, std: float):
    """Exact E[eps | x_t] for data ~ N(mean, std^2): sqrt(1-a) (x - sqrt(a) mean) / (a std^2 + 1 - a)."""

    def denoise(x, t):
        alpha = ALPHAS_CUMPROD[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return (1 - alpha).sqrt() * (x - alpha.sqrt() * mean) / (alpha * std**2 + 1 - alpha)

    return denoise


def test_ddim_timesteps_match_the_original_and_work_for_any_count():
    np.testing.assert_array_equal(ddim_timesteps(200, 1000), np.arange(1, 1000, 5))
    for count in (1, 3, 7, 50, 333, 999, 1000):
        steps = ddim_timesteps(count, 1000)
        assert len(steps) == count == len(set(steps.tolist()))
        assert steps.min() >= 0 and steps.max() <= 999
    with pytest.raises(ValueError, match="1..1000"):
        ddim_timesteps(1001, 1000)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_point_mass_is_recovered(name):
    target = torch.linspace(-0.5, 1.5, 24, dtype=torch.float64).reshape(1, 1, 2, 3, 4)
    sampler = make_sampler(name, ALPHAS_CUMPROD, eta=0.0)
    result = sample_loop(sampler, point_mass_denoiser(target), target.shape, 25,
                         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(result.double(), target, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("sampler", "steps", "tolerance"), [
    (DDIMSampler(ALPHAS_CUMPROD, eta=1.0), 1000, 0.05),
    (DDPMSampler(ALPHAS_CUMPROD), 1000, 0.05),
    (DDIMSampler(ALPHAS_CUMPROD, eta=0.0), 100, 0.08),
], ids=["ddim-eta1", "ddpm", "ddim-eta0"])
def test_gaussian_data_statistics_are_reproduced(sampler, steps, tolerance):
    """With the exact denoiser the samples follow the data law; ancestral sampling with the fixed (small) posterior
    variance under-disperses with few steps (std 0.26 instead of 0.30 at 100 steps), hence 1000 steps here."""
    mean, std = 0.7, 0.3
    samples = sample_loop(sampler, gaussian_denoiser(mean, std), (20000, 1), steps,
                          generator=torch.Generator().manual_seed(1))
    assert float(samples.mean()) == pytest.approx(mean, abs=0.01)
    assert float(samples.std()) == pytest.approx(std, rel=tolerance)


def test_ddim_with_eta_one_is_ancestral_ddpm():
    denoise = gaussian_denoiser(0.2, 0.5)
    ddim = sample_loop(DDIMSampler(ALPHAS_CUMPROD, eta=1.0), denoise, (64, 1), 40,
                       generator=torch.Generator().manual_seed(4))
    ddpm = sample_loop(DDPMSampler(ALPHAS_CUMPROD), denoise, (64, 1), 40, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=1e-4)


def test_same_generator_same_sample_and_new_seed_new_sample():
    denoise = gaussian_denoiser(0.0, 1.0)
    sampler = DDIMSampler(ALPHAS_CUMPROD, eta=1.0)
    first = sample_loop(sampler, denoise, (2, 1, 4, 4, 4), 10, generator=torch.Generator().manual_seed(5))
    again = sample_loop(sampler, denoise, (2, 1, 4, 4, 4), 10, generator=torch.Generator().manual_seed(5))
    other = sample_loop(sampler, denoise, (2, 1, 4, 4, 4), 10, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("blend", ["clean", "renoise"])
def test_inpainting_keeps_the_known_region_exactly(blend):
    known = torch.randn(1, 4, 6, 6, 6, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 1, 6, 6, 6)
    mask[..., 2:4, 1:5, 2:5] = 1
    result = sample_loop(DDIMSampler(ALPHAS_CUMPROD), gaussian_denoiser(0.0, 1.0), known.shape, 8,
                         generator=torch.Generator().manual_seed(3), known=known, mask=mask, blend=blend)
    outside = (mask == 0).expand_as(known)
    assert torch.equal(result[outside], known[outside])
    assert not torch.allclose(result[~outside], known[~outside])


def test_add_noise_formula_and_bad_arguments():
    x0, noise = torch.ones(3), torch.full((3,), 2.0)
    sampler = DDIMSampler(ALPHAS_CUMPROD)
    alpha = float(ALPHAS_CUMPROD[500])
    torch.testing.assert_close(sampler.add_noise(x0, noise, 500), torch.full((3,), alpha**0.5 + 2 * (1 - alpha) ** 0.5))
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("plms", ALPHAS_CUMPROD)
    with pytest.raises(ValueError, match="needs both"):
        sample_loop(sampler, gaussian_denoiser(0, 1), (1, 1), 2, known=torch.zeros(1, 1))
