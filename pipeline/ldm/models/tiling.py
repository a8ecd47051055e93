"""Sliding-window application of a network to volumes too large for one pass, with smooth blending.

A volume ``(B, C, *S)`` is cut into overlapping tiles; each tile goes through ``run_tile`` (which may resample
by a fixed factor, e.g. ×1/2 for the VQ encoder and ×2 for its decoder); overlapping outputs are averaged
with a raised-cosine window that falls to ~0 across each overlap shared with a neighbouring tile and stays 1
on the volume's outer border. Pairwise overlaps blend with weights that sum to one (sin² + cos² = 1).
"""
from __future__ import annotations

import itertools
import math
from fractions import Fraction
from typing import Callable, Sequence

import torch

from ldm.errors import ConfigError


def per_axis(value: int | Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    """``value`` repeated for ``dims`` axes, or checked to have ``dims`` entries."""
    values = (int(value),) * dims if isinstance(value, (int, float)) else tuple(int(v) for v in value)
    if len(values) != dims:
        raise ConfigError(f"{name}: expected one value or {dims} values, got {value!r}")
    return values


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start indices of tiles of length ``min(tile, size)`` covering ``size`` with at least ``overlap`` shared."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def ramp_window(length: int, left: int, right: int) -> torch.Tensor:
    """1D weights: rising sin² over the first ``left`` samples, falling cos² over the last ``right``, else 1."""
    window = torch.ones(length, dtype=torch.float64)
    if left > 0:
        window[:left] = torch.sin(0.5 * math.pi * (torch.arange(left, dtype=torch.float64) + 0.5) / left) ** 2
    if right > 0:
        position = (torch.arange(right, dtype=torch.float64) + 0.5) / right
        window[length - right:] = window[length - right:] * torch.cos(0.5 * math.pi * position) ** 2
    return window


def sliding_window(run_tile: Callable[[torch.Tensor], torch.Tensor], volume: torch.Tensor,
                   tile: int | Sequence[int], overlap: int | Sequence[int], scale: Fraction | int = 1,
                   align: int = 1) -> torch.Tensor:
    """Apply ``run_tile`` to overlapping tiles of ``volume`` and blend the outputs.

    ``tile``/``overlap`` are in voxels of ``volume`` (one value or one per spatial axis); a tile larger than the
    volume shrinks to it. ``scale`` is the output size per input voxel of ``run_tile``; ``align`` forces tile
    starts and sizes to multiples of it (the encoder needs multiples of its downsampling factor, so every spatial
    size of ``volume`` must then be a multiple of ``align`` too). Returns a float32 tensor
    ``(B, C_out, *S·scale)`` on ``volume``'s device.
    """
    spatial = tuple(volume.shape[2:])
    dims = len(spatial)
    tile, overlap = per_axis(tile, dims, "tile"), per_axis(overlap, dims, "overlap")
    scale = Fraction(scale)
    axes = []
    for size, length, shared in zip(spatial, tile, overlap):
        if length % align or shared % align or size % align:
            raise ConfigError(f"tiling: tile {tile}, overlap {overlap} and volume size {spatial} must be multiples "
                              f"of {align}")
        if not 0 <= shared < length:
            raise ConfigError(f"tiling: overlap {overlap} must be >= 0 and smaller than the tile {tile}")
        length = min(length, size)
        axes.append([(start, length) for start in tile_starts(size, length, shared)])
    output = weight = None
    for corner in itertools.product(*axes):
        result = run_tile(volume[(Ellipsis, *(slice(start, start + length) for start, length in corner))])
        result = result.to(device=volume.device, dtype=torch.float32)
        if output is None:
            out_spatial = tuple(int(size * scale) for size in spatial)
            output = torch.zeros((result.shape[0], result.shape[1], *out_spatial), device=volume.device)
            weight = torch.zeros(out_spatial, device=volume.device)
        window, out_slices = None, []
        for axis, (start, length) in enumerate(corner):
            starts = [s for s, _ in axes[axis]]
            position = starts.index(start)
            left = starts[position - 1] + length - start if position > 0 else 0
            right = start + length - starts[position + 1] if position + 1 < len(starts) else 0
            axis_window = ramp_window(int(length * scale), int(left * scale), int(right * scale))
            shape = [1] * dims
            shape[axis] = -1
            axis_window = axis_window.view(shape)
            window = axis_window if window is None else window * axis_window
            out_slices.append(slice(int(start * scale), int((start + length) * scale)))
        window = window.to(device=volume.device, dtype=torch.float32)
        output[(Ellipsis, *out_slices)] += result * window
        weight[tuple(out_slices)] += window
    return output / weight
