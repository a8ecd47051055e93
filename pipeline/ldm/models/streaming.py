"""Streamed (layer-by-layer) VQ encoding and decoding of volumes too large for one pass.

Every convolution of the VQ ``Encoder``/``Decoder`` runs over the whole volume, tile by tile: each output tile
reads its input box plus the convolution's halo (one voxel for k3), applies the pointwise operations in front of
the convolution (GroupNorm + SiLU, quantisation, 1×1 convs) and writes its result into a whole-volume activation.
Output tiles partition each layer's output (no overlap, no blending). While a tile is written, per-channel sums
and sums of squares (float64) are added up; once the pass is over they give the exact whole-volume GroupNorm
statistics of that activation, so the next layer can normalise without any extra pass. Zero padding happens only
at the volume's true border, so the result equals the whole-volume forward up to float rounding (sums in another
order; measured max difference ~1e-6 in float32).

Activations live on ``storage`` (host memory when they do not fit on the compute device); tiles are computed on
the module's device. A ResnetBlock keeps two activations alive (its input, overwritten in place by its output, and
its hidden activation), so peak memory is about two activations of the widest layer plus one tile's workspace.

Only what the LesionDiffusion VQ uses streams: k3 convs, stride-2 conv downsampling, nearest ×2 + conv upsampling,
1×1 shortcuts and no attention (``attn_type: none``); ``supports_streaming`` tells whether a network qualifies.
Inference only (no gradients, dropout off).
"""
from __future__ import annotations

import itertools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.model import AttnBlock, Decoder, Downsample, Encoder, ResnetBlock, Upsample
from ldm.modules.diffusionmodules.util import onednn_applies

Pointwise = Callable[[torch.Tensor], torch.Tensor]


class Activation:
    """A whole-volume activation ``(B, C, *S)`` on ``storage`` plus float64 sums ``(B, C)`` of what was written."""

    def __init__(self, data: torch.Tensor):
        self.data = data
        self.sums: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    @classmethod
    def empty(cls, shape: Sequence[int], storage: torch.device) -> "Activation":
        return cls(torch.empty(tuple(shape), dtype=torch.float32, device=storage))

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.data.shape[2:])

    def reset_sums(self) -> None:
        self.sums = self.squares = None

    def write(self, box: tuple[slice, ...], tile: torch.Tensor) -> None:
        """Store ``tile`` at ``box`` and add its per-sample, per-channel sums (on the tile's device, float64)."""
        axes = list(range(2, tile.dim()))
        sums, squares = tile.sum(axes, dtype=torch.float64), tile.square().sum(axes, dtype=torch.float64)
        self.sums = sums if self.sums is None else self.sums + sums
        self.squares = squares if self.squares is None else self.squares + squares
        self.data[(Ellipsis, *box)].copy_(tile)  # synchronous: a device tile is complete before it is stored

    def group_statistics(self, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-volume mean and biased variance of each sample's groups, per channel: float64 ``(B, C)``."""
        batch, channels = self.data.shape[:2]
        per_group = channels // norm.num_groups
        count = self.data[0, 0].numel() * per_group
        mean = self.sums.view(batch, norm.num_groups, per_group).sum(-1) / count
        squares = self.squares.view(batch, norm.num_groups, per_group).sum(-1) / count
        variance = (squares - mean ** 2).clamp_min(0.0)
        return mean.repeat_interleave(per_group, dim=1), variance.repeat_interleave(per_group, dim=1)


def supports_streaming(network: nn.Module) -> bool:
    """Whether ``network`` (a VQ Encoder or Decoder) has only layers the streamed forward handles."""
    if not isinstance(network, (Encoder, Decoder)):
        return False
    for module in network.modules():
        if isinstance(module, AttnBlock) or (isinstance(module, ResnetBlock) and hasattr(module, "conv_shortcut")):
            return False
        if isinstance(module, (Downsample, Upsample)) and not module.with_conv:
            return False
    return True


def norm_silu(norm: nn.GroupNorm, source: Activation) -> Pointwise:
    """GroupNorm with ``source``'s whole-volume statistics, then SiLU, as a function of any box of ``source``."""
    mean, variance = source.group_statistics(norm)
    scale = torch.rsqrt(variance + norm.eps) * norm.weight.double()
    shift = norm.bias.double() - mean * scale
    shape = tuple(mean.shape) + (1,) * (source.data.dim() - 2)
    scale, shift = scale.float().view(shape), shift.float().view(shape)
    return lambda x: F.silu(torch.addcmul(shift.to(x.device), x, scale.to(x.device)), inplace=True)


def convolve(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """``conv`` on ``x`` without padding; float32 CPU tiles always through oneDNN (PyTorch would send small tiles
    to its much slower im2col path)."""
    zeros = (0,) * (x.dim() - 2)
    if onednn_applies(x):
        return torch.mkldnn_convolution(x, conv.weight, conv.bias, zeros, conv.stride, conv.dilation, conv.groups)
    return getattr(F, f"conv{x.dim() - 2}d")(x, conv.weight, conv.bias, stride=conv.stride, dilation=conv.dilation,
                                             groups=conv.groups)


class Streamer:
    """Runs convolution stages over whole activations tile by tile (see the module docstring)."""

    def __init__(self, tile: Sequence[int], volume_spatial: Sequence[int], device: torch.device,
                 storage: torch.device):
        self.tile, self.volume_spatial = tuple(tile), tuple(volume_spatial)
        self.device, self.storage = device, storage

    def boxes(self, spatial: Sequence[int]) -> list[tuple[slice, ...]]:
        """Output tiles partitioning ``spatial``; the tile edge scales with the layer's resolution."""
        axes = []
        for size, tile, volume_size in zip(spatial, self.tile, self.volume_spatial):
            edge = max(1, tile * size // volume_size)
            axes.append([slice(start, min(start + edge, size)) for start in range(0, size, edge)])
        return list(itertools.product(*axes))

    def conv(self, source: Activation, conv: nn.Module, *, pre: Pointwise | None = None,
             post: Pointwise | None = None, upsample: bool = False, pad_end: int = 0,
             residual: tuple[Activation, nn.Module | None] | None = None, out: Activation | None = None
             ) -> Activation:
        """``post(conv(upsample(pre(source))))`` (+ ``shortcut(residual)``) into ``out`` (new unless given).

        ``conv`` runs without its own padding: the zeros it would add (and ``pad_end`` more after each axis, as
        Downsample adds) come from reading outside the volume, so cut faces see their true neighbours.
        ``out`` may be ``residual``'s activation (in place: each tile reads the residual only inside its box).
        """
        kernel, stride, padding = conv.kernel_size, conv.stride, conv.padding
        conv_input = tuple(size * (2 if upsample else 1) for size in source.spatial)
        if out is None:
            spatial = [(size + 2 * pad + pad_end - k) // s + 1
                       for size, k, s, pad in zip(conv_input, kernel, stride, padding)]
            out = Activation.empty((source.data.shape[0], conv.out_channels, *spatial), self.storage)
        out.reset_sums()
        for box in self.boxes(out.spatial):
            wanted = [(b.start * s - pad, (b.stop - 1) * s - pad + k)
                      for b, k, s, pad in zip(box, kernel, stride, padding)]
            x = self._read(source, wanted, conv_input, pre, upsample)
            y = convolve(x, conv)
            if residual is not None:
                skip, shortcut = residual
                skip_tile = skip.data[(Ellipsis, *box)].to(self.device, non_blocking=True)
                y = y + (shortcut(skip_tile) if shortcut is not None else skip_tile)
            out.write(box, post(y) if post is not None else y)
        return out

    def _read(self, source: Activation, wanted: list[tuple[int, int]], conv_input: Sequence[int],
              pre: Pointwise | None, upsample: bool) -> torch.Tensor:
        """The conv input over ``wanted`` (conv-input coordinates), zero outside the volume, on the device."""
        inside = [(max(low, 0), min(high, size)) for (low, high), size in zip(wanted, conv_input)]
        factor = 2 if upsample else 1
        read = tuple(slice(low // factor, -(-high // factor)) for low, high in inside)
        x = source.data[(Ellipsis, *read)].to(self.device, non_blocking=True)
        if pre is not None:
            x = pre(x)
        if upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = x[(Ellipsis, *(slice(low - r.start * 2, high - r.start * 2) for (low, high), r in zip(inside, read)))]
        padding: list[int] = []
        for (low, high), (in_low, in_high) in reversed(list(zip(wanted, inside))):
            padding += [in_low - low, high - in_high]
        return F.pad(x, padding) if any(padding) else x

    def resnet(self, x: Activation, block: ResnetBlock) -> Activation:
        """A ResnetBlock: two conv stages; the output overwrites ``x`` when the channel count stays."""
        hidden = self.conv(x, block.conv1, pre=norm_silu(block.norm1, x))
        shortcut = getattr(block, "nin_shortcut", None)
        out = x if shortcut is None else None
        result = self.conv(hidden, block.conv2, pre=norm_silu(block.norm2, hidden), residual=(x, shortcut), out=out)
        del hidden
        return result


def _check_inference(module: nn.Module) -> None:
    """Raise unless the network is in inference mode with no active dropout."""
    for block in module.modules():
        if isinstance(block, nn.Dropout) and block.training and block.p > 0:
            raise RuntimeError("streamed VQ forward runs in eval mode only (dropout is active)")


def stream_encoder(encoder: Encoder, volume: torch.Tensor, tile: Sequence[int], device: torch.device,
                   storage: torch.device, post: Pointwise | None = None) -> torch.Tensor:
    """``post(encoder(volume))`` streamed; ``volume`` ``(B, C, *S)`` on ``storage``; result on ``storage``."""
    _check_inference(encoder)
    streamer = Streamer(tile, volume.shape[2:], device, storage)
    h = streamer.conv(Activation(volume), encoder.conv_in)
    for down in encoder.down:
        for block in down.block:
            h = streamer.resnet(h, block)
        if hasattr(down, "downsample"):
            h = streamer.conv(h, down.downsample.conv, pad_end=1)
    h = streamer.resnet(h, encoder.mid.block_1)
    h = streamer.resnet(h, encoder.mid.block_2)
    out = streamer.conv(h, encoder.conv_out, pre=norm_silu(encoder.norm_out, h), post=post)
    return out.data


def stream_decoder(decoder: Decoder, latent: torch.Tensor, tile: Sequence[int], device: torch.device,
                   storage: torch.device, pre: Pointwise | None = None) -> torch.Tensor:
    """``decoder(pre(latent))`` streamed; ``latent`` ``(B, C, *L)`` on ``storage``; result on ``storage``."""
    _check_inference(decoder)
    streamer = Streamer(tile, latent.shape[2:], device, storage)
    h = streamer.conv(Activation(latent), decoder.conv_in, pre=pre)
    h = streamer.resnet(h, decoder.mid.block_1)
    h = streamer.resnet(h, decoder.mid.block_2)
    for level in reversed(range(decoder.num_resolutions)):
        up = decoder.up[level]
        for block in up.block:
            h = streamer.resnet(h, block)
        if hasattr(up, "upsample"):
            h = streamer.conv(h, up.upsample.conv, upsample=True)
    if decoder.give_pre_end:
        return h.data
    post = torch.tanh if decoder.tanh_out else None
    return streamer.conv(h, decoder.conv_out, pre=norm_silu(decoder.norm_out, h), post=post).data
