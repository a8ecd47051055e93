"""CT intensity map of LesionDiffusion: Hounsfield units <-> the [0, 1] range the VQ-GAN and LINet see.

The original code maps HU with a piecewise-linear function through the knots
HU ``[-1000, -200, 200, 1000]`` -> ``[0, 0.2, 0.8, 1]`` and clamps outside (below -1000 HU -> 0, above
1000 HU -> 1). Soft tissue (-200..200 HU) thus gets 60 % of the range. :func:`unit_to_hu` is the exact inverse on
[-1000, 1000] HU (the original inverted the map by swapping the knot lists, which is the same function).

Both functions accept numpy arrays (or scalars) and torch tensors and return the same kind, on the same device;
floating inputs keep their dtype, integer inputs become float32.
"""
from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np
import torch

from ldm.errors import ConfigError

AIR_HU = -1000.0
HU_KNOTS = (-1000.0, -200.0, 200.0, 1000.0)
UNIT_KNOTS = (0.0, 0.2, 0.8, 1.0)

ArrayLike = TypeVar("ArrayLike", np.ndarray, torch.Tensor)


def check_knots(source_knots: Sequence[float],
                target_knots: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Validate a knot pair (same length >= 2, both strictly increasing); returns them as float tuples."""
    source = tuple(float(k) for k in source_knots)
    target = tuple(float(k) for k in target_knots)
    if len(source) != len(target) or len(source) < 2:
        raise ConfigError(
            f"intensity knots: need two lists of equal length >= 2, got {list(source)} and {list(target)}"
        )
    for knots in (source, target):
        if any(b <= a for a, b in zip(knots, knots[1:])):
            raise ConfigError(f"intensity knots {list(knots)} must be strictly increasing")
    return source, target


def piecewise_linear(values: ArrayLike, source_knots: Sequence[float], target_knots: Sequence[float]) -> ArrayLike:
    """Map ``values`` through the polyline ``source_knots -> target_knots``, clamped to its end points.

    Each segment is evaluated from its own left knot, so a value equal to a knot maps exactly to the target knot.
    """
    source, target = check_knots(source_knots, target_knots)
    if isinstance(values, torch.Tensor):
        values = values if values.is_floating_point() else values.to(torch.float32)
        where, clamped = torch.where, values.clamp(source[0], source[-1])
    else:
        values = np.asarray(values)
        values = values if np.issubdtype(values.dtype, np.floating) else values.astype(np.float32)
        where, clamped = np.where, np.clip(values, source[0], source[-1])
    result = None
    for index in range(len(source) - 1):
        slope = (target[index + 1] - target[index]) / (source[index + 1] - source[index])
        segment = (clamped - source[index]) * slope + target[index]
        result = segment if result is None else where(clamped >= source[index], segment, result)
    return result.astype(values.dtype, copy=False) if isinstance(result, np.ndarray) else result


def hu_to_unit(hu: ArrayLike, hu_knots: Sequence[float] = HU_KNOTS,
               unit_knots: Sequence[float] = UNIT_KNOTS) -> ArrayLike:
    """HU -> model intensity in [0, 1] (unitless); values outside [-1000, 1000] HU are clamped."""
    return piecewise_linear(hu, hu_knots, unit_knots)


def unit_to_hu(unit: ArrayLike, hu_knots: Sequence[float] = HU_KNOTS,
               unit_knots: Sequence[float] = UNIT_KNOTS) -> ArrayLike:
    """Model intensity in [0, 1] -> HU in [-1000, 1000]; the exact inverse of :func:`hu_to_unit` on that range."""
    return piecewise_linear(unit, unit_knots, hu_knots)
