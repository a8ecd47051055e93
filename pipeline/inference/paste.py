"""Putting LINet's decoded crop back into the original CT, in HU, so that only the lesion region changes.

The blend weight of a voxel depends on its distance ``d`` (in voxels) to the lesion: 1 up to ``dilate`` voxels,
then a raised-cosine fall over ``feather`` voxels, and exactly 0 from ``dilate + feather + 1`` on. Where the
weight is 0 the output is the input value itself (bit-identical); nothing outside the lesion region is clipped,
rescaled or reconstructed (the original replaced the whole CT by a VQ reconstruction clipped to [-1000, 1000]).

The VQ reconstruction can be offset from the CT by a few HU; with ``match_surroundings`` the median difference
between CT and reconstruction over the feathered band is added to the decoded crop first, so the seam does not
show (the original's unused v1 paste matched means in a similar way).

Output dtype: the input's class. A float input keeps its dtype; an unscaled integer input keeps its dtype when
it holds [-1000, 1000] HU, else int16; a scaled integer input (slope/intercept) becomes int16 when every value
is an integer in range, else float32 (written values are then exact HU; :func:`ldm.data.volume.write_volume`
writes slope 1).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ldm.data.crops import CropWindow
from ldm.data.intensity import HU_KNOTS
from ldm.data.volume import Geometry

INT16 = np.iinfo(np.int16)


def blend_weights(lesion: np.ndarray, dilate: int, feather: int) -> np.ndarray:
    """Float32 weights in [0, 1] of the same shape as the boolean ``lesion`` (module docstring rule)."""
    lesion = np.asarray(lesion, dtype=bool)
    if not lesion.any():
        return np.zeros(lesion.shape, dtype=np.float32)
    distance = ndimage.distance_transform_edt(~lesion)
    weights = np.zeros(lesion.shape, dtype=np.float64)
    weights[distance <= dilate] = 1.0
    band = (distance > dilate) & (distance < dilate + feather + 1)
    weights[band] = 0.5 * (1.0 + np.cos(math.pi * (distance[band] - dilate) / (feather + 1)))
    return weights.astype(np.float32)


def lesion_region(lesions: np.ndarray, dilate: int, feather: int) -> np.ndarray:
    """Boolean mask of every voxel a paste around ``lesions`` may change (weight above 0)."""
    return blend_weights(lesions, dilate, feather) > 0


def surroundings_offset(original: np.ndarray, generated: np.ndarray, weights: np.ndarray) -> float:
    """Median of ``original - generated`` (HU) over the feathered band (0 < weight < 1); 0.0 when it is empty."""
    band = (weights > 0) & (weights < 1)
    if not band.any():
        return 0.0
    return float(np.median(original[band] - generated[band]))


def paste_generated(volume: np.ndarray, generated: np.ndarray, lesion: np.ndarray, window: CropWindow,
                    dilate: int, feather: int, match_surroundings: bool = True) -> float:
    """Blend the generated crop (HU, crop shape) into ``volume`` (HU, modified in place) around ``lesion`` (bool,
    crop shape) where the crop was taken; returns the HU offset applied to the generated values."""
    weights = blend_weights(lesion, dilate, feather)[window.crop_slices()]
    generated = np.asarray(generated, dtype=np.float64)[window.crop_slices()]
    target = volume[window.volume_slices()]
    original = target.astype(np.float64)
    offset = surroundings_offset(original, generated, weights) if match_surroundings else 0.0
    changed = weights > 0
    blended = original[changed] + weights[changed] * (generated[changed] + offset - original[changed])
    target[changed] = blended.astype(volume.dtype)
    return offset


def working_dtype(geometry: Geometry) -> np.dtype:
    """The float dtype to hold the CT in memory without changing any value (float64 only for float64 files)."""
    return np.dtype(np.float64) if geometry.header.get_data_dtype() == np.float64 else np.dtype(np.float32)


def output_dtype(geometry: Geometry, volume: np.ndarray) -> np.dtype:
    """The dtype to write the result in (module docstring rule); ``volume`` is the input CT in HU as read."""
    stored = np.dtype(geometry.header.get_data_dtype())
    if np.issubdtype(stored, np.floating):
        return stored
    slope, intercept = geometry.header.get_slope_inter()
    scaled = (slope is not None and slope != 1.0) or (intercept is not None and intercept != 0.0)
    if not scaled:
        limits = np.iinfo(stored)
        return stored if limits.min <= HU_KNOTS[0] and limits.max >= HU_KNOTS[-1] else np.dtype(np.int16)
    integral = bool(np.all(np.mod(volume, 1) == 0))
    in_range = volume.size == 0 or (volume.min() >= INT16.min and volume.max() <= INT16.max)
    return np.dtype(np.int16) if integral and in_range else np.dtype(np.float32)
