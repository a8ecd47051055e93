"""Resampling of ``(z, y, x)`` volumes: to a target voxel spacing, and nearest-neighbour resizing of label maps."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from ldm.errors import ConfigError, DataError

MAX_SHAPE_MISMATCH = 3


def as_spacing(target_spacing: float | Sequence[float]) -> tuple[float, float, float]:
    """A target spacing in mm as ``(z, y, x)``: one number for isotropic, or three numbers."""
    values = [float(target_spacing)] * 3 if np.isscalar(target_spacing) else [float(v) for v in target_spacing]
    if len(values) != 3 or min(values) <= 0:
        raise ConfigError(
            f"target_spacing must be a positive number or three positive numbers (z, y, x), got {target_spacing!r}"
        )
    return tuple(values)


def respaced_shape(shape: Sequence[int], spacing: Sequence[float],
                   target_spacing: Sequence[float]) -> tuple[int, int, int]:
    """Shape of a volume of ``shape`` voxels of ``spacing`` mm once resampled to ``target_spacing`` mm."""
    return tuple(max(int(round(n * s / t)), 1) for n, s, t in zip(shape, spacing, target_spacing))


def respace(array: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float], order: int) -> np.ndarray:
    """Resample a ``(z, y, x)`` array from ``spacing`` to ``target_spacing`` (mm) with spline ``order``
    (1 for images, 0 for label maps); same dtype; the output shape is :func:`respaced_shape`."""
    shape = respaced_shape(array.shape, spacing, target_spacing)
    if shape == tuple(array.shape):
        return array
    factors = [new / old for new, old in zip(shape, array.shape)]
    return ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)


def resize_nearest(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a ``(z, y, x)`` array to ``shape``; output voxel ``i`` of an axis going from
    ``n`` to ``m`` voxels takes source voxel ``floor(i * n / m)``."""
    index = [np.minimum((np.arange(new) * old) // new, old - 1) for new, old in zip(shape, array.shape)]
    return array[np.ix_(*index)]


def match_shape(array: np.ndarray, shape: Sequence[int], source: str, reference: str) -> np.ndarray:
    """``array`` unchanged when it has ``shape``; nearest-resized when every axis differs by at most
    :data:`MAX_SHAPE_MISMATCH` voxels (as the original loader); DataError naming both files otherwise."""
    shape = tuple(int(s) for s in shape)
    if tuple(array.shape) == shape:
        return array
    if all(abs(a - b) <= MAX_SHAPE_MISMATCH for a, b in zip(array.shape, shape)):
        return resize_nearest(array, shape)
    raise DataError(
        f"{source}: shape {tuple(array.shape)} does not match {reference} {shape} (more than "
        f"{MAX_SHAPE_MISMATCH} voxels apart): the files of a case must share one voxel grid"
    )
