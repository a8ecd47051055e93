"""Samplers: DDPM ancestral, DDIM, DPM-Solver++ (2M, 2M SDE) and UniPC behind one small interface, no Lightning.

A sampler holds a noise schedule and exposes ``set_timesteps(n)``, ``step(eps, index, x, generator)`` and
``add_noise(x0, noise, t)``, like diffusers schedulers. :func:`sample_loop` runs one from pure noise with a
``denoise(x_t, t) -> eps`` callable and an optional inpainting blend, so a new sampler is a new small class.
:data:`SAMPLERS` is the one registry of names (read by the inference options and the command lines);
:class:`SamplerSettings` is what a caller chooses (name, steps, eta, timestep spacing) as one object.
DDIM and DDPM are written here (DDIM is the original's sampler, kept exactly); the fast solvers are diffusers'
``DPMSolverMultistepScheduler`` and ``UniPCMultistepScheduler`` fed this model's own beta schedule.
Every random draw takes a ``torch.Generator`` (or one per batch item): the same seed gives the same sample exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
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


def check_step_count(num_steps: int, num_train_timesteps: int) -> None:
    """ValueError unless ``num_steps`` is an integer in ``1..num_train_timesteps``."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) \
            or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"the number of sampling steps must be in 1..{num_train_timesteps}, got {num_steps}")


def ddim_timesteps(num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """Ascending DDIM timesteps, uniform as the original (``1, 6, ..., 996`` for 200 of 1000), for any count.

    The original ``range(0, T, T // n) + 1`` can return more than ``n`` steps or index ``T`` (e.g. 3 steps);
    here there are always exactly ``num_steps`` distinct values in ``[0, T - 1]``.
    """
    check_step_count(num_steps, num_train_timesteps)
    stride = num_train_timesteps // num_steps
    steps = np.arange(num_steps) * stride
    offset = 1 if steps[-1] + 1 < num_train_timesteps else 0
    return (steps + offset).astype(np.int64)


def spaced_timesteps(num_steps: int, num_train_timesteps: int, spacing: str) -> np.ndarray:
    """Ascending timesteps for ``spacing``: ``original`` (:func:`ddim_timesteps`), or diffusers' ``linspace``
    (``round(linspace(0, T - 1, n + 1))`` without its 0) and ``trailing`` (``T - 1, T - 1 - T/n, ...``), which start
    at the noisiest step ``T - 1`` (the fast solvers need that at small step counts)."""
    check_step_count(num_steps, num_train_timesteps)
    if spacing == "original":
        return ddim_timesteps(num_steps, num_train_timesteps)
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()[1:].astype(np.int64)
    if spacing == "trailing":
        return (np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps).round()[::-1] - 1).astype(np.int64)
    raise ValueError(f"unknown timestep spacing {spacing!r}; choose original, linspace or trailing")


class RespacedSampler:
    """Shared part of DDIM and DDPM: the training schedule ``alphas_cumprod`` restricted to the chosen steps."""

    def __init__(self, alphas_cumprod: torch.Tensor, spacing: str = "original"):
        self.alphas_cumprod = alphas_cumprod.detach().double().cpu()
        self.num_train_timesteps = len(self.alphas_cumprod)
        self.spacing = spacing
        self.set_timesteps(min(50, self.num_train_timesteps))

    def set_timesteps(self, num_steps: int) -> torch.Tensor:
        """Choose ``num_steps`` timesteps; returns them in sampling (descending) order."""
        ascending = spaced_timesteps(num_steps, self.num_train_timesteps, self.spacing)
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

    def __init__(self, alphas_cumprod: torch.Tensor, eta: float = 1.0, spacing: str = "original"):
        self.eta = float(eta)
        super().__init__(alphas_cumprod, spacing)

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


def schedule_betas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """The betas (float64) whose cumulative product is ``alphas_cumprod``: the model's own schedule for diffusers."""
    alphas_cumprod = alphas_cumprod.detach().double().cpu().numpy()
    return 1.0 - alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])


class MultistepSolver:
    """A diffusers multistep solver (DPM-Solver++ or UniPC) behind this module's interface.

    The scheduler gets the model's betas (``trained_betas``, so its ``alphas_cumprod`` is the model's up to float32
    rounding), eps-prediction, data-prediction updates, a last step to clean data (``final_sigmas_type="zero"``)
    and the timestep ``spacing``: ``karras`` (Karras et al. noise levels, dense near clean data; the UNet gets the
    nearest integer timestep), ``lu`` (uniform in log-SNR, DPM-Solver only), or diffusers' ``linspace`` /
    ``trailing``. Uniform timesteps end with one long first-order step to clean data from ``t = T / n``; with 10-20
    steps that step costs more accuracy than the second-order updates gain (``tests/test_samplers.py``). Its
    stochastic form takes the noise of each step from :func:`randn`, so every batch item draws from its own
    generator. Steps must run in order after :meth:`set_timesteps` (the solver keeps earlier predictions)."""

    def __init__(self, alphas_cumprod: torch.Tensor, make_scheduler: Callable[..., object], stochastic: bool,
                 spacing: str = "karras"):
        self.alphas_cumprod = alphas_cumprod.detach().double().cpu()
        self.num_train_timesteps = len(self.alphas_cumprod)
        self.stochastic = stochastic
        spacing_config = {"karras": {"use_karras_sigmas": True}, "lu": {"use_lu_lambdas": True}}.get(
            spacing, {"timestep_spacing": spacing})
        self.scheduler = make_scheduler(num_train_timesteps=self.num_train_timesteps,
                                        trained_betas=schedule_betas(self.alphas_cumprod), prediction_type="epsilon",
                                        final_sigmas_type="zero", lower_order_final=True, **spacing_config)
        self.set_timesteps(min(20, self.num_train_timesteps))

    def set_timesteps(self, num_steps: int) -> torch.Tensor:
        """Choose ``num_steps`` timesteps and forget earlier steps; returns them in sampling (descending) order."""
        check_step_count(num_steps, self.num_train_timesteps)
        self.scheduler.set_timesteps(num_steps)
        self.scheduler.set_begin_index(0)  # else a repeated first timestep (Karras, many steps) starts at its copy
        self.timesteps = self.scheduler.timesteps.cpu()
        return self.timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """``q(x_t | x_0)``: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        alpha = float(self.alphas_cumprod[int(t)])
        return alpha**0.5 * x0 + (1 - alpha) ** 0.5 * noise

    def step(self, eps: torch.Tensor, index: int, x: torch.Tensor, generator: Generators = None):
        """One update at ``self.timesteps[index]`` (``index`` must follow the previous call's); returns
        ``(x_prev, predicted_x0)``. The update runs in float32 whatever the UNet's autocast dtype."""
        if self.scheduler.step_index is not None and self.scheduler.step_index != index:
            raise ValueError(f"{type(self.scheduler).__name__}: step {index} after step {self.scheduler.step_index - 1}"
                             "; multistep solvers run their steps in order")
        noise = randn(x.shape, generator, x.device, torch.float32) if self.stochastic else None
        extra = {"variance_noise": noise} if self.stochastic else {}
        x_prev = self.scheduler.step(eps.float(), self.timesteps[index], x.float(), **extra).prev_sample
        return x_prev.to(x.dtype), self.scheduler.model_outputs[-1].to(x.dtype)


def _dpm_solver(alphas_cumprod: torch.Tensor, settings: "SamplerSettings", stochastic: bool) -> MultistepSolver:
    from diffusers import DPMSolverMultistepScheduler

    def make(**config):
        return DPMSolverMultistepScheduler(solver_order=2, solver_type="midpoint", **config,
                                           algorithm_type="sde-dpmsolver++" if stochastic else "dpmsolver++")

    return MultistepSolver(alphas_cumprod, make, stochastic, settings.resolved_spacing)


def _unipc(alphas_cumprod: torch.Tensor, settings: "SamplerSettings") -> MultistepSolver:
    from diffusers import UniPCMultistepScheduler

    def make(**config):
        return UniPCMultistepScheduler(solver_order=2, predict_x0=True, solver_type="bh2", **config)

    return MultistepSolver(alphas_cumprod, make, False, settings.resolved_spacing)


@dataclass(frozen=True)
class SamplerKind:
    """One entry of :data:`SAMPLERS`: how to build it, the timestep spacings it takes (the first is its
    default), whether ``eta`` matters and whether it draws noise at every step."""

    build: Callable[[torch.Tensor, "SamplerSettings"], object]
    spacings: tuple[str, ...]
    uses_eta: bool
    stochastic: bool
    summary: str


DPM_SPACINGS = ("karras", "lu", "linspace", "trailing")
SAMPLERS: dict[str, SamplerKind] = {
    "ddim": SamplerKind(lambda a, s: DDIMSampler(a, eta=s.eta, spacing=s.resolved_spacing),
                        ("original", "linspace", "trailing"), True, True,
                        "DDIM (the original's sampler; eta 0 deterministic, eta 1 DDPM-like noise)"),
    "ddpm": SamplerKind(lambda a, s: DDPMSampler(a, spacing=s.resolved_spacing), ("original", "linspace", "trailing"),
                        False, True, "ancestral DDPM with the respaced posterior variance"),
    "dpmpp_2m": SamplerKind(lambda a, s: _dpm_solver(a, s, stochastic=False), DPM_SPACINGS, False, False,
                            "DPM-Solver++ 2M (diffusers), deterministic"),
    "dpmpp_2m_sde": SamplerKind(lambda a, s: _dpm_solver(a, s, stochastic=True), DPM_SPACINGS, False, True,
                                "DPM-Solver++ 2M SDE (diffusers), the stochastic counterpart of DDIM eta 1"),
    "unipc": SamplerKind(_unipc, ("karras", "linspace", "trailing"), False, False,
                         "UniPC, 2nd order, bh2 (diffusers), deterministic"),
}


@dataclass(frozen=True)
class SamplerSettings:
    """What a caller chooses about sampling: sampler ``name`` (a key of :data:`SAMPLERS`), number of ``steps``,
    DDIM's ``eta`` (ignored by the others) and the timestep ``spacing`` (None: the sampler's default)."""

    name: str = "ddim"
    steps: int = 50
    eta: float = 1.0
    spacing: str | None = None

    def __post_init__(self):
        if self.name not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.name!r}; choose one of {', '.join(SAMPLERS)}")
        if self.spacing is not None and self.spacing not in SAMPLERS[self.name].spacings:
            raise ValueError(f"sampler {self.name!r} takes the timestep spacing "
                             f"{' or '.join(SAMPLERS[self.name].spacings)}, not {self.spacing!r}")

    @property
    def resolved_spacing(self) -> str:
        """The spacing used: the chosen one or the sampler's default."""
        return self.spacing or SAMPLERS[self.name].spacings[0]


def make_sampler(settings: SamplerSettings, alphas_cumprod: torch.Tensor):
    """The sampler of ``settings`` on the schedule ``alphas_cumprod`` (its timesteps not yet set)."""
    return SAMPLERS[settings.name].build(alphas_cumprod, settings)


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
    sampler,
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
