"""UNet building blocks: timestep-conditioned residual blocks, resampling and the non-transformer attention block.

Sub-module names equal those of the original LesionDiffusion checkpoints (``in_layers``, ``emb_layers``,
``out_layers``, ``skip_connection``, ``op``, ``conv``, ``qkv``, ``proj_out``). Resampling acts on every spatial
axis (the LesionDiffusion 3D variant; the LDM base kept the first axis of 3D maps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import ConfigError
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import avg_pool_nd, checkpoint, conv_nd, normalization, zero_module


class TimestepBlock(nn.Module):
    """Marker base class: a module whose ``forward(x, emb)`` also takes the timestep embedding."""


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to TimestepBlocks and the context to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Returns the output of the last layer."""
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour ×2 on every spatial axis, then (with ``use_conv``) a 3×…×3 conv named ``conv``."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 3, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ConfigError("Upsample: changing the channel count needs use_conv=True")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``(B, out_channels, 2·S1, 2·S2, …)``."""
        if x.shape[1] != self.channels:
            raise ConfigError(f"Upsample: expected {self.channels} channels, got {x.shape[1]}")
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Halve every spatial axis: a 3×…×3 conv with stride 2 (``use_conv``) or 2×…×2 average pooling, named ``op``."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 3, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=2, padding=1)
        elif self.out_channels != channels:
            raise ConfigError("Downsample: changing the channel count needs use_conv=True")
        else:
            self.op = avg_pool_nd(dims, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``(B, out_channels, ⌈S1/2⌉, …)`` (conv) or ``⌊S/2⌋`` (pooling)."""
        if x.shape[1] != self.channels:
            raise ConfigError(f"Downsample: expected {self.channels} channels, got {x.shape[1]}")
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding.

    ``in_layers`` GN → SiLU → conv3; the projected embedding (``emb_layers`` SiLU → Linear) is added, or with
    ``use_scale_shift_norm`` applied as ``GN(h)·(1+scale)+shift``; ``out_layers`` GN → SiLU → Dropout →
    zero-initialised conv3; skip path identity or 1×…×1 conv. ``up``/``down`` resample inside the block.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 dims: int = 3, use_checkpoint: bool = False, use_scale_shift_norm: bool = False,
                 up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, out_channels, out_channels, 3, padding=1)))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = conv_nd(dims, channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, *spatial), ``emb`` (B, emb_channels). Returns (B, out_channels, *spatial')."""
        return checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - 2)))
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over all positions, used when the UNet is built without spatial transformers.

    GroupNorm → 1-D conv ``qkv`` → per-head attention → zero-initialised 1-D conv ``proj_out`` → residual. With
    ``use_new_attention_order`` the qkv channels are split into q, k, v before the heads; otherwise (legacy order)
    into heads first. Heads: ``channels // num_head_channels`` when given, else ``num_heads``.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, use_new_attention_order: bool = False):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ConfigError(f"AttentionBlock: channels={channels} not divisible by "
                                  f"num_head_channels={num_head_channels}")
            num_heads = channels // num_head_channels
        if num_heads < 1 or channels % num_heads:
            raise ConfigError(f"AttentionBlock: channels={channels} not divisible into num_heads={num_heads}")
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.use_new_attention_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, *spatial). Returns a tensor shaped like ``x``."""
        return checkpoint(self._forward, x, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        flat = x.reshape(batch, channels, -1)
        qkv = self.qkv(self.norm(flat))
        length, dim_head = qkv.shape[-1], channels // self.num_heads
        if self.use_new_attention_order:
            query, key, value = (part.reshape(batch, self.num_heads, dim_head, length)
                                 for part in qkv.chunk(3, dim=1))
        else:
            query, key, value = qkv.reshape(batch, self.num_heads, 3 * dim_head, length).split(dim_head, dim=2)
        attended = F.scaled_dot_product_attention(
            query.transpose(-1, -2), key.transpose(-1, -2), value.transpose(-1, -2))
        h = self.proj_out(attended.transpose(-1, -2).reshape(batch, channels, length))
        return (flat + h).reshape(batch, channels, *spatial)
