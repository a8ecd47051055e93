"""Samplers: DDPM ancestral and DDIM, one small interface, no Lightning.

A sampler holds a noise schedule and exposes ``set_timesteps(n)``, ``step(eps, index, x, generator)`` and
``add_noise(x0, noise, t)``, like diffusers schedulers. :func:`sample_loop` runs one from pure noise with a
``denoise(x_t, t) -> eps`` callable and an optional inpainting blend, so a new sampler is a new small class.
Every random draw takes a ``torch.Generator`` (or one per batch item): the same seed gives the same sample exactly.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BLEND_MODES = ("clean", "renoise")
# One generator for the whole batch, or one per batch item (see :func:`randn`).
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape, generator: Generators, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``device``.

    With a sequence of generators (one per batch item) item ``i`` is drawn from generator ``i`` alone, so an item
    of a batch gets exactly the noise it gets when sampled by itself with the same generator."""
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), item, device, dtype) for item in generator])
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def ddim_timesteps(num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """Ascending DDIM timesteps, uniform as the original (``1, 6, ..., 996`` for 200 of 1000), for any count.

    The original ``range(0, T, T // n) + 1`` can return more than ``n`` steps or index ``T`` (e.g. 3 steps);
    here there are always exactly ``num_steps`` distinct values in ``[0, T - 1]``.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"the number of sampling steps must be in 1..{num_train_timesteps}, got {num_steps}")
    stride = num_train_timesteps // num_steps
    steps = np.arange(num_steps) * stride
    offset = 1 if steps[-1] + 1 < num_train_timesteps else 0
    return (steps + offset).astype(np.int64)


class RespacedSampler:
    """Shared part of the samplers: the training schedule ``alphas_cumprod`` restricted to the chosen steps."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.detach().double().cpu()
        self.num_train_timesteps = len(self.alphas_cumprod)
        self.set_timesteps(min(50, self.num_train_timesteps))

    def set_timesteps(self, num_steps: int) -> torch.Tensor:
        """Choose ``num_steps`` timesteps; returns them in sampling (descending) order."""
        ascending = ddim_timesteps(num_steps, self.num_train_timesteps)
        alphas = self.alphas_cumprod[ascending]
        # The last step lands on clean data (alpha = 1); the original stopped at alphas_cumprod[0], which leaves
        # a noise level of sqrt(1 - alphas_cumprod[0]) (about 0.04 for the release schedule) in every sample.
        alphas_prev = torch.cat([torch.ones(1, dtype=alphas.dtype), alphas[:-1]])
        self.timesteps = torch.from_numpy(ascending[::-1].copy())
        self._alphas, self._alphas_prev = alphas.flip(0), alphas_prev.flip(0)
        return self.timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """``q(x_t | x_0)``: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        alpha = float(self.alphas_cumprod[int(t)])
        return alpha**0.5 * x0 + (1 - alpha) ** 0.5 * noise

    def predict_x0(self, eps: torch.Tensor, index: int, x: torch.Tensor) -> torch.Tensor:
        """The clean sample implied by the noise prediction ``eps`` at step ``index``."""
        alpha = float(self._alphas[index])
        return (x - (1 - alpha) ** 0.5 * eps) / alpha**0.5


class DDIMSampler(RespacedSampler):
    """DDIM (Song et al.) with ``eta`` (0 deterministic, 1 = DDPM-like noise, the original's default)."""

    def __init__(self, alphas_cumprod: torch.Tensor, eta: float = 1.0):
        self.eta = float(eta)
        super().__init__(alphas_cumprod)

    def set_timesteps(self, num_steps: int) -> torch.Tensor:
        timesteps = super().set_timesteps(num_steps)
        alphas, alphas_prev = self._alphas, self._alphas_prev
        self._sigmas = self.eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
        return timesteps

    def step(self, eps: torch.Tensor, index: int, x: torch.Tensor, generator: Generators = None):
        """One update at ``self.timesteps[index]``; returns ``(x_prev, predicted_x0)``."""
        alpha_prev, sigma = float(self._alphas_prev[index]), float(self._sigmas[index])
        predicted_x0 = self.predict_x0(eps, index, x)
        direction = max(1 - alpha_prev - sigma**2, 0.0) ** 0.5 * eps
        x_prev = alpha_prev**0.5 * predicted_x0 + direction
        if sigma > 0:
            x_prev = x_prev + sigma * randn(x.shape, generator, x.device, x.dtype)
        return x_prev, predicted_x0


class DDPMSampler(RespacedSampler):
    """Ancestral DDPM sampling with the posterior variance (fixed small) on any subset of the training steps.

    With all training steps this is the classic ancestral sampler; with fewer it uses the respaced posterior.
    """

    def set_timesteps(self, num_steps: int) -> torch.Tensor:
        timesteps = super().set_timesteps(num_steps)
        self._betas = 1 - self._alphas / self._alphas_prev
        self._posterior_variance = self._betas * (1 - self._alphas_prev) / (1 - self._alphas)
        return timesteps

    def step(self, eps: torch.Tensor, index: int, x: torch.Tensor, generator: Generators = None):
        """One ancestral update at ``self.timesteps[index]``; returns ``(x_prev, predicted_x0)``."""
        alpha, alpha_prev = float(self._alphas[index]), float(self._alphas_prev[index])
        beta, variance = float(self._betas[index]), float(self._posterior_variance[index])
        predicted_x0 = self.predict_x0(eps, index, x)
        mean = alpha_prev**0.5 * beta / (1 - alpha) * predicted_x0 + (1 - beta) ** 0.5 * (1 - alpha_prev) / (1 - alpha) * x
        if index == len(self.timesteps) - 1 or variance <= 0:
            return mean, predicted_x0
        return mean + variance**0.5 * randn(x.shape, generator, x.device, x.dtype), predicted_x0


def make_sampler(name: str, alphas_cumprod: torch.Tensor, eta: float = 1.0) -> RespacedSampler:
    """Build a sampler by name: ``ddim`` (uses ``eta``) or ``ddpm``."""
    if name == "ddim":
        return DDIMSampler(alphas_cumprod, eta=eta)
    if name == "ddpm":
        return DDPMSampler(alphas_cumprod)
    raise ValueError(f"unknown sampler {name!r}; choose 'ddim' or 'ddpm'")


def blend_known(x: torch.Tensor, known: torch.Tensor, mask: torch.Tensor, sampler, t: int | None,
                mode: str, generator: Generators) -> torch.Tensor:
    """Keep the unknown region (``mask`` = 1) of ``x`` and the known content elsewhere.

    ``clean`` pastes the clean known latent (the original LINet sampler, which matches its training);
    ``renoise`` pastes the known latent noised to timestep ``t`` (RePaint-style).
    """
    if mode == "renoise" and t is not None:
        known = sampler.add_noise(known, randn(known.shape, generator, known.device, known.dtype), t)
    return x * mask + known * (1 - mask)


@torch.no_grad()
def sample_loop(
    sampler: RespacedSampler,
    denoise: Denoiser,
    shape: tuple[int, ...],
    num_steps: int,
    generator: Generators = None,
    device: torch.device | str = "cpu",
    known: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    blend: str = "clean",
    progress: bool = False,
) -> torch.Tensor:
    """Sample from noise of ``shape``; with ``known``/``mask`` the region where ``mask`` is 0 is inpainted from
    ``known`` before every step and once at the end. Returns the sample (``x`` after the last step)."""
    if blend not in BLEND_MODES:
        raise ValueError(f"unknown blend mode {blend!r}; choose one of {BLEND_MODES}")
    if (known is None) != (mask is None):
        raise ValueError("inpainting needs both `known` and `mask`")
    timesteps = sampler.set_timesteps(num_steps)
    x = randn(shape, generator, device)
    for index, t in enumerate(tqdm(timesteps.tolist(), desc="sampling", disable=not progress, leave=False)):
        if known is not None:
            x = blend_known(x, known, mask, sampler, t, blend, generator)
        t_batch = torch.full((shape[0],), t, device=x.device, dtype=torch.long)
        x, _ = sampler.step(denoise(x, t_batch), index, x, generator)
    if known is not None:
        x = blend_known(x, known, mask, sampler, None, "clean", generator)
    return x
