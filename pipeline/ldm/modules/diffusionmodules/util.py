"""Small building blocks shared by the UNet and the diffusion classes.

Timestep embedding, normalisation, dimension-generic conv/pool factories (with the ``fast_conv`` switch), beta
schedules and activation checkpointing. The numerics follow the original LesionDiffusion code so released
checkpoints behave the same.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ldm.errors import ConfigError

BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")
SPATIAL_DIMS = (1, 2, 3)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    Returns a float32 tensor of shape ``(N, dim)``: ``[cos(t·f_i), sin(t·f_i)]`` with
    ``f_i = exp(-ln(max_period)·i/half)``, ``i = 0..half-1``, ``half = dim // 2`` (cosines first, as in the
    original checkpoints); an odd ``dim`` gets one trailing zero column.
    """
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    frequencies = torch.exp(-math.log(max_period) * exponents)
    angles = timesteps.reshape(-1, 1).to(torch.float32) * frequencies[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def normalization(channels: int) -> nn.GroupNorm:
    """GroupNorm used by ResBlocks and the output head: 32 groups when ``channels`` allows it, else one group per
    channel (eps 1e-5, affine). Returns the module."""
    groups = 32 if channels % 32 == 0 else channels
    return nn.GroupNorm(groups, channels, eps=1e-5)


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero in place and return the module (zero-initialised residual heads)."""
    for parameter in module.parameters():
        parameter.detach().zero_()
    return module


def _check_dims(dims: int) -> None:
    if dims not in SPATIAL_DIMS:
        raise ConfigError(f"dims={dims!r}: only 1, 2 or 3 spatial dimensions are supported")


class SwitchableConv:
    """Mixin for ``nn.ConvNd``: with ``fast = True`` a float32 CPU convolution always runs through oneDNN.

    PyTorch sends small CPU convolutions (e.g. 16 channels at 32³ voxels) to its im2col fallback
    (``slow_conv3d``), measured 10-17× slower than oneDNN on the same input; results agree within float32
    rounding (different summation order). No parameters are added, so state-dict keys stay those of ``nn.ConvNd``.
    Other devices and dtypes use PyTorch's own choice.
    """

    fast = False

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.fast and onednn_applies(input, self.padding_mode, self.padding):
            return torch.mkldnn_convolution(input, weight, bias, self.padding, self.stride, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


def onednn_applies(input: torch.Tensor, padding_mode: str = "zeros", padding=(0,)) -> bool:
    """Whether ``torch.mkldnn_convolution`` can take this convolution (float32 CPU, zero or no padding)."""
    return (input.device.type == "cpu" and input.dtype == torch.float32 and padding_mode == "zeros"
            and not isinstance(padding, str) and torch.backends.mkldnn.is_available())


class Conv1d(SwitchableConv, nn.Conv1d):
    """``nn.Conv1d`` with the ``fast`` switch of ``SwitchableConv``."""


class Conv2d(SwitchableConv, nn.Conv2d):
    """``nn.Conv2d`` with the ``fast`` switch of ``SwitchableConv``."""


class Conv3d(SwitchableConv, nn.Conv3d):
    """``nn.Conv3d`` with the ``fast`` switch of ``SwitchableConv``."""


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """Return a ``Conv1d``/``Conv2d``/``Conv3d`` (``nn.ConvNd`` + ``fast`` switch) chosen by ``dims``."""
    _check_dims(dims)
    return (Conv1d, Conv2d, Conv3d)[dims - 1](*args, **kwargs)


def set_fast_conv(module: nn.Module, enabled: bool) -> None:
    """Turn the oneDNN path of every ``SwitchableConv`` inside ``module`` on or off (see ``SwitchableConv``)."""
    for layer in module.modules():
        if isinstance(layer, SwitchableConv):
            layer.fast = bool(enabled)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """Return ``nn.AvgPool1d``/``AvgPool2d``/``AvgPool3d`` built with the given arguments, chosen by ``dims``."""
    _check_dims(dims)
    return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](*args, **kwargs)


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """Noise variances β_t of a diffusion process.

    Returns a float64 array of shape ``(n_timestep,)``.
    ``"linear"`` is linear in sqrt-space (``linspace(√start, √end)²``, the LDM convention used by the release
    configs), ``"sqrt_linear"`` is linear in β, ``"sqrt"`` is ``linspace(start, end)^0.5`` and ``"cosine"`` is the
    improved-DDPM cosine schedule (offset ``cosine_s``, β clipped to [0, 0.999]).
    """
    if n_timestep < 1:
        raise ConfigError(f"timesteps={n_timestep!r}: a beta schedule needs at least one step")
    if schedule == "linear":
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64, device="cpu") ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64, device="cpu") / n_timestep + cosine_s
        alphas_cumprod = torch.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
        betas = (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0.0, 0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu")
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu") ** 0.5
    else:
        raise ConfigError(f"beta_schedule={schedule!r}: expected one of {', '.join(BETA_SCHEDULES)}")
    return betas.numpy()


def checkpoint(function: Callable[..., torch.Tensor], *inputs: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Run ``function(*inputs)``; when ``enabled`` and autograd is recording, drop its activations and recompute
    them in the backward pass (``torch.utils.checkpoint``, non-reentrant). Returns the function's output;
    results and gradients are identical either way, only memory and time change."""
    if enabled and torch.is_grad_enabled():
        return torch_checkpoint(function, *inputs, use_reentrant=False)
    return function(*inputs)
