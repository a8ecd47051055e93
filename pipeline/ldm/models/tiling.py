"""Sliding-window application of a network to volumes too large for one pass, with smooth blending.

For the VQ without attention layers ``ldm.models.streaming`` is the exact and faster way (one pass per layer);
this module remains for networks with attention and for quick per-tile-normalised previews.

A volume ``(B, C, *S)`` is cut into overlapping tiles; each tile goes through ``run_tile`` (which may resample
by a fixed factor, e.g. ×1/2 for the VQ encoder and ×2 for its decoder). Outputs are blended with a smooth
window: across each overlap shared by two neighbours the weight passes from one tile to the other with a
raised-cosine band (a quarter of the overlap wide, centred; the two weights sum to one), so each tile
contributes only where it is at least 3/8 of the overlap away from its cut face; at the volume's outer border
the weight stays 1.

GroupNorm makes naive tiling inexact everywhere, not only at the seams: each tile would normalise with its own
statistics (air-only tiles versus body tiles differ a lot). With ``sync_norms`` the GroupNorm layers of that
network use statistics of the whole volume instead: one measuring pass per GroupNorm layer runs every tile up to
that layer and accumulates sums over the tile's share of the volume (its "core"; the cores partition the volume),
then the final pass normalises with the exact global statistics. The cost is at most (number of GroupNorm
layers + 1) tiled forward passes (the measuring passes stop early); memory stays that of one tile. What remains
is the zero padding at cut faces, which does not reach voxels farther from a cut face than the network's
receptive radius R: with ``3/8 · overlap ≥ R`` the blended result equals the whole-volume one up to float
rounding.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
from fractions import Fraction
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ldm.errors import ConfigError

Box = tuple[tuple[int, int], ...]
BLEND_FRACTION = 0.25


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
    """1D blend weights of a tile of ``length`` sharing ``left``/``right`` voxels with its neighbours.

    Inside each shared stretch only a band of ``BLEND_FRACTION`` of it, centred on its middle, blends (sin² rising,
    cos² falling, so two neighbours sum to one); before the band the nearer tile has weight 1, after it 0.
    A tile therefore contributes nothing within ``(1 - BLEND_FRACTION) / 2`` of a shared stretch of its cut face.
    """
    window = torch.ones(length, dtype=torch.float64)
    if left > 0:
        band, offset = _band(left)
        rising = torch.sin(0.5 * math.pi * (torch.arange(band, dtype=torch.float64) + 0.5) / band) ** 2
        window[:offset] = 0.0
        window[offset:offset + band] = rising
    if right > 0:
        band, offset = _band(right)
        falling = torch.cos(0.5 * math.pi * (torch.arange(band, dtype=torch.float64) + 0.5) / band) ** 2
        start = length - right + offset
        window[start:start + band] *= falling
        window[start + band:] = 0.0
    return window


def _band(shared: int) -> tuple[int, int]:
    """Width of the blending band inside a shared stretch of ``shared`` voxels, and its offset from the start."""
    band = max(1, round(shared * BLEND_FRACTION))
    return band, (shared - band) // 2


class Tile:
    """One tile: its box in the input volume, its core (share of the volume for statistics) and blend ramps."""

    def __init__(self, box: Box, core: Box, ramps: tuple[tuple[int, int], ...]):
        self.box, self.core, self.ramps = box, core, ramps

    def slices(self, scale: Fraction = Fraction(1)) -> tuple[slice, ...]:
        return tuple(slice(int(start * scale), int(stop * scale)) for start, stop in self.box)

    def window(self, scale: Fraction, device: torch.device) -> torch.Tensor:
        """Blend weights over the tile's output (product of per-axis ramps), float32."""
        window = None
        for axis, ((start, stop), (left, right)) in enumerate(zip(self.box, self.ramps)):
            axis_window = ramp_window(int((stop - start) * scale), int(left * scale), int(right * scale))
            shape = [1] * len(self.box)
            shape[axis] = -1
            axis_window = axis_window.view(shape)
            window = axis_window if window is None else window * axis_window
        return window.to(device=device, dtype=torch.float32)


def layout_tiles(spatial: Sequence[int], tile: Sequence[int], overlap: Sequence[int], align: int) -> list[Tile]:
    """Tiles covering ``spatial``; tile and core boundaries are multiples of ``align``."""
    axes = []
    for size, length, shared in zip(spatial, tile, overlap):
        if length % align or shared % align or size % align:
            raise ConfigError(f"tiling: tile {tuple(tile)}, overlap {tuple(overlap)} and volume size "
                              f"{tuple(spatial)} must be multiples of {align}")
        if not 0 <= shared < length:
            raise ConfigError(f"tiling: overlap {tuple(overlap)} must be >= 0 and smaller than the tile "
                              f"{tuple(tile)}")
        length = min(length, size)
        starts = tile_starts(size, length, shared)
        # Cores split each overlap at its middle (rounded to ``align``) so that they partition the axis.
        cuts = [0] + [(nxt + start + length) // 2 // align * align for start, nxt in zip(starts, starts[1:])] + [size]
        axis = []
        for index, start in enumerate(starts):
            left = starts[index - 1] + length - start if index > 0 else 0
            right = start + length - starts[index + 1] if index + 1 < len(starts) else 0
            axis.append(((start, start + length), (cuts[index], cuts[index + 1]), (left, right)))
        axes.append(axis)
    return [Tile(tuple(a[0] for a in combo), tuple(a[1] for a in combo), tuple(a[2] for a in combo))
            for combo in itertools.product(*axes)]


class _StopTile(Exception):
    """Raised inside a measuring pass once the GroupNorm being measured has seen its input."""


class GroupNormSync:
    """Makes the GroupNorm layers of a network normalise with statistics of the whole tiled volume."""

    def __init__(self, network: nn.Module):
        self.norms = [module for module in network.modules() if isinstance(module, nn.GroupNorm)]
        self.stats: dict[nn.GroupNorm, tuple[torch.Tensor, torch.Tensor]] = {}
        self.measuring: nn.GroupNorm | None = None
        self.sums: list[torch.Tensor] | None = None
        self.tile: Tile | None = None

    @property
    def complete(self) -> bool:
        return len(self.stats) == len(self.norms)

    @contextlib.contextmanager
    def active(self) -> Iterator["GroupNormSync"]:
        """Within the block, every GroupNorm of the network runs ``self._forward``."""
        # An instance attribute shadows the class's ``forward``; deleting it restores the original.
        for norm in self.norms:
            norm.forward = functools.partial(self._forward, norm)
        try:
            yield self
        finally:
            for norm in self.norms:
                del norm.forward

    def _forward(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if norm not in self.stats:
            if self.measuring is None:
                self.measuring = norm
            if norm is self.measuring:
                self._accumulate(norm, x)
            raise _StopTile
        mean, var = self.stats[norm]
        grouped = x.reshape(x.shape[0], norm.num_groups, -1)
        normalised = (grouped - mean.to(x.dtype)[..., None]) * torch.rsqrt(var.to(x.dtype)[..., None] + norm.eps)
        normalised = normalised.reshape(x.shape)
        if norm.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            normalised = normalised * norm.weight.view(shape) + norm.bias.view(shape)
        return normalised

    def _accumulate(self, norm: nn.GroupNorm, x: torch.Tensor) -> None:
        """Add the sums over the tile's core (at ``x``'s resolution) to the running float64 totals."""
        core = []
        for axis, ((start, stop), (core_start, core_stop)) in enumerate(zip(self.tile.box, self.tile.core)):
            scale = Fraction(x.shape[2 + axis], stop - start)
            low, high = (core_start - start) * scale, (core_stop - start) * scale
            if low.denominator != 1 or high.denominator != 1:
                raise ConfigError(f"tiling: tile core {self.tile.core} does not map onto a whole number of voxels "
                                  f"at resolution {tuple(x.shape[2:])}; use tiles aligned to the resampling factor")
            core.append(slice(int(low), int(high)))
        values = x[(Ellipsis, *core)].reshape(x.shape[0], norm.num_groups, -1)
        sums = [values.sum(-1, dtype=torch.float64), values.square().sum(-1, dtype=torch.float64),
                torch.full(values.shape[:2], values.shape[-1], dtype=torch.float64, device=x.device)]
        self.sums = sums if self.sums is None else [total + part for total, part in zip(self.sums, sums)]

    def measure_pass(self, run_tile: Callable[[torch.Tensor], torch.Tensor], volume: torch.Tensor,
                     tiles: list[Tile]) -> None:
        """Run every tile up to the next unmeasured GroupNorm and store that layer's global mean and variance."""
        self.measuring, self.sums = None, None
        for tile in tiles:
            self.tile = tile
            try:
                run_tile(volume[(Ellipsis, *tile.slices())])
            except _StopTile:
                continue
            # A complete forward means the remaining GroupNorm layers are never called by this network.
            self.stats.update({norm: (None, None) for norm in self.norms if norm not in self.stats})
            return
        total, total_squares, count = self.sums
        mean = total / count
        self.stats[self.measuring] = (mean, (total_squares / count - mean ** 2).clamp_min(0.0))


def sliding_window(run_tile: Callable[[torch.Tensor], torch.Tensor], volume: torch.Tensor,
                   tile: int | Sequence[int], overlap: int | Sequence[int], scale: Fraction | int = 1,
                   align: int = 1, sync_norms: nn.Module | None = None) -> torch.Tensor:
    """Apply ``run_tile`` to overlapping tiles of ``volume`` and blend the outputs.

    ``tile``/``overlap`` are in voxels of ``volume`` (one value or one per spatial axis); a tile larger than the
    volume shrinks to it. ``scale`` is the output size per input voxel of ``run_tile``; ``align`` forces tile
    starts and sizes to multiples of it (the encoder needs multiples of its downsampling factor, so every spatial
    size of ``volume`` must then be a multiple of ``align`` too). ``sync_norms``: a network called by
    ``run_tile`` whose GroupNorm layers should use whole-volume statistics (see the module docstring; runs under
    ``torch.no_grad``). Returns a float32 tensor ``(B, C_out, *S·scale)`` on ``volume``'s device.
    """
    spatial = tuple(volume.shape[2:])
    dims = len(spatial)
    tiles = layout_tiles(spatial, per_axis(tile, dims, "tile"), per_axis(overlap, dims, "overlap"), align)
    scale = Fraction(scale)
    sync = GroupNormSync(sync_norms) if sync_norms is not None else None
    with contextlib.ExitStack() as stack:
        if sync is not None:
            stack.enter_context(torch.no_grad())
            stack.enter_context(sync.active())
            while not sync.complete:
                sync.measure_pass(run_tile, volume, tiles)
        return _blend(run_tile, volume, tiles, scale)


def _blend(run_tile: Callable[[torch.Tensor], torch.Tensor], volume: torch.Tensor, tiles: list[Tile],
           scale: Fraction) -> torch.Tensor:
    output = weight = None
    out_spatial = tuple(int(size * scale) for size in volume.shape[2:])
    for tile in tiles:
        result = run_tile(volume[(Ellipsis, *tile.slices())]).to(device=volume.device, dtype=torch.float32)
        if output is None:
            output = torch.zeros((result.shape[0], result.shape[1], *out_spatial), device=volume.device)
            weight = torch.zeros(out_spatial, device=volume.device)
        window = tile.window(scale, volume.device)
        output[(Ellipsis, *tile.slices(scale))] += result * window
        weight[tile.slices(scale)] += window
    return output / weight
