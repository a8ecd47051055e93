"""Encoder and Decoder of the VQ-GAN (3D by default, 2D with ``dims=2``).

Parameter and sub-module names follow the original LesionDiffusion/taming code so that a released ``VQ.ckpt``
loads with ``strict=True`` (see ``../shared/compat/vq.json``). Differences from the original, all without effect
on the state-dict keys:

* ``sample_depth`` (levels that resample) mirrors exactly: an encoder downsample after level ``j`` is undone by a
  decoder upsample after level ``j + 1``. The original decoder tested ``num_res_blocks - i in sample_depth``,
  which gives the same layout only for the release config (``num_res_blocks 1``, ``sample_depth [0]``).
* Gradient checkpointing is optional (``use_checkpoint``) and uses ``torch.utils.checkpoint`` (non-reentrant).
* ``attn_type: vanilla`` attention runs through ``scaled_dot_product_attention``.
* Without autograd the SiLU after each GroupNorm runs in place (one full-size temporary less).
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.errors import ConfigError
from ldm.modules.diffusionmodules.util import conv_nd as util_conv_nd

NORM_GROUPS = 16
NORM_EPS = 1e-6
ATTN_TYPES = ("vanilla", "none")


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A ``Conv2d`` or ``Conv3d`` for ``dims`` spatial axes (with the ``fast`` switch of ``SwitchableConv``)."""
    if dims not in (2, 3):
        raise ConfigError(f"ddconfig.dims: {dims} is not supported (use 2 or 3)")
    return util_conv_nd(dims, *args, **kwargs)


def swish(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when autograd is off (``x`` is then a temporary: a GroupNorm output)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 16 groups and eps 1e-6, as the original VQ-GAN uses."""
    if channels % NORM_GROUPS:
        raise ConfigError(f"ddconfig: {channels} channels cannot be split into {NORM_GROUPS} GroupNorm groups; "
                          f"use ch and ch_mult whose products are multiples of {NORM_GROUPS}")
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 on every spatial axis, then (optionally) a k3 conv."""

    def __init__(self, channels: int, with_conv: bool, dims: int = 3):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = conv_nd(dims, channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """Halve every spatial axis (floor): zero pad (0, 1) per axis + k3 stride-2 conv, or 2× average pooling."""

    def __init__(self, channels: int, with_conv: bool, dims: int = 3):
        super().__init__()
        self.with_conv = with_conv
        self.dims = dims
        if with_conv:
            self.conv = conv_nd(dims, channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            # Asymmetric padding (after each axis only) keeps the original's voxel alignment: n -> floor(n / 2).
            return self.conv(F.pad(x, (0, 1) * self.dims, mode="constant", value=0.0))
        pool = F.avg_pool3d if self.dims == 3 else F.avg_pool2d
        return pool(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv -> GN -> swish -> dropout -> conv, plus a (1×1 or k3 conv) shortcut; no time embedding."""

    def __init__(self, *, in_channels: int, out_channels: int | None = None, conv_shortcut: bool = False,
                 dropout: float = 0.0, dims: int = 3, use_checkpoint: bool = False):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_checkpoint = use_checkpoint
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv_nd(dims, in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv_nd(dims, out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = conv_nd(dims, in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = conv_nd(dims, in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if hasattr(self, "conv_shortcut"):
            x = self.conv_shortcut(x)
        elif hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all voxels (1×1 q/k/v/proj convs), residual."""

    def __init__(self, channels: int, dims: int = 3):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = conv_nd(dims, channels, channels, kernel_size=1)
        self.k = conv_nd(dims, channels, channels, kernel_size=1)
        self.v = conv_nd(dims, channels, channels, kernel_size=1)
        self.proj_out = conv_nd(dims, channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        batch, channels = h.shape[:2]

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, 1, channels, -1).transpose(-1, -2)

        attended = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        attended = attended.transpose(-1, -2).reshape(h.shape)
        return x + self.proj_out(attended)


def make_attn(channels: int, attn_type: str, dims: int) -> nn.Module:
    """The attention block of a level: ``AttnBlock`` for "vanilla", ``nn.Identity`` for "none"."""
    if attn_type == "vanilla":
        return AttnBlock(channels, dims)
    if attn_type == "none":
        return nn.Identity()
    raise ConfigError(f"ddconfig.attn_type: {attn_type!r} is not supported (choose from {ATTN_TYPES})")


def _resampling_levels(sample_depth: Sequence[int] | None, num_resolutions: int) -> list[int]:
    """Encoder levels followed by a ×2 downsampling (default: every level but the last)."""
    if sample_depth is None:
        return list(range(num_resolutions - 1))
    levels = sorted({int(level) for level in sample_depth})
    if any(level < 0 or level >= num_resolutions - 1 for level in levels):
        raise ConfigError(f"ddconfig.sample_depth: {list(sample_depth)} must list levels in 0..{num_resolutions - 2} "
                          f"(ch_mult has {num_resolutions} levels; the last level never resamples)")
    return levels


def _largest_size(resolution: int | Sequence[int]) -> int:
    """The working size attention levels are compared against (the largest axis of ``resolution``)."""
    return int(resolution) if isinstance(resolution, int) else int(max(resolution))


class Encoder(nn.Module):
    """Image ``(B, in_channels, *S)`` -> latent ``(B, z_channels (×2 if double_z), *S / 2**n)``.

    ``n`` is the number of resampling levels (``len(sample_depth)``); each one floors odd sizes.
    """

    def __init__(self, *, ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int | Sequence[int], z_channels: int, double_z: bool = True,
                 attn_type: str = "vanilla", sample_depth: Sequence[int] | None = None, dims: int = 3,
                 use_checkpoint: bool = False):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resampling_levels = _resampling_levels(sample_depth, self.num_resolutions)
        self.conv_in = conv_nd(dims, in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = _largest_size(resolution)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for level in range(self.num_resolutions):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[level], ch * ch_mult[level]
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout, dims=dims,
                                          use_checkpoint=use_checkpoint))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(make_attn(block_in, attn_type, dims))
            down = nn.Module()
            down.block, down.attn = blocks, attns
            if level in self.resampling_levels:
                down.downsample = Downsample(block_in, resamp_with_conv, dims)
                curr_res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout, dims=dims,
                                       use_checkpoint=use_checkpoint)
        self.mid.attn_1 = make_attn(block_in, attn_type, dims)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout, dims=dims,
                                       use_checkpoint=use_checkpoint)
        self.norm_out = group_norm(block_in)
        self.conv_out = conv_nd(dims, block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1,
                                padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            for index, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[index](h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``(B, z_channels, *L)`` -> image ``(B, out_ch, *L * 2**n)`` (no output activation unless ``tanh_out``)."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0, resamp_with_conv: bool = True,
                 resolution: int | Sequence[int], z_channels: int, give_pre_end: bool = False,
                 tanh_out: bool = False, attn_type: str = "vanilla", sample_depth: Sequence[int] | None = None,
                 dims: int = 3, use_checkpoint: bool = False):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out
        upsampling_levels = {level + 1 for level in _resampling_levels(sample_depth, self.num_resolutions)}
        block_in = ch * ch_mult[-1]
        curr_res = _largest_size(resolution) // 2 ** len(upsampling_levels)
        self.conv_in = conv_nd(dims, z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout, dims=dims,
                                       use_checkpoint=use_checkpoint)
        self.mid.attn_1 = make_attn(block_in, attn_type, dims)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout, dims=dims,
                                       use_checkpoint=use_checkpoint)
        levels: list[nn.Module] = []
        for level in reversed(range(self.num_resolutions)):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout, dims=dims,
                                          use_checkpoint=use_checkpoint))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(make_attn(block_in, attn_type, dims))
            up = nn.Module()
            up.block, up.attn = blocks, attns
            if level in upsampling_levels:
                up.upsample = Upsample(block_in, resamp_with_conv, dims)
                curr_res *= 2
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = conv_nd(dims, block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for index, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[index](h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(swish(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


def split_ddconfig(ddconfig: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split one ``ddconfig`` into the keyword arguments of ``Encoder`` and ``Decoder``.

    One config describes both halves (``out_ch`` is the decoder's, ``in_channels``/``double_z`` the encoder's);
    a key neither accepts raises ``ConfigError`` instead of being dropped silently.
    """
    encoder_keys = set(inspect.signature(Encoder.__init__).parameters) - {"self"}
    decoder_keys = set(inspect.signature(Decoder.__init__).parameters) - {"self"}
    unknown = sorted(set(ddconfig) - encoder_keys - decoder_keys)
    if unknown:
        raise ConfigError(f"ddconfig: unknown key(s) {unknown}; accepted: {sorted(encoder_keys | decoder_keys)}")
    encoder_kwargs = {key: value for key, value in ddconfig.items() if key in encoder_keys}
    decoder_kwargs = {key: value for key, value in ddconfig.items() if key in decoder_keys}
    return encoder_kwargs, decoder_kwargs
