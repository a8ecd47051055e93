"""Putting LINet's decoded crop back into the original CT, in HU, so that only the lesion and a thin rim change.

The blend weight of a voxel depends on its Euclidean distance ``d`` in **mm** (the voxel spacing counts, so the
rule is the same at any resolution) to the nearest lesion voxel: 1 inside the lesion, a raised cosine
``(1 + cos(pi d / rim_mm)) / 2`` for ``0 < d < rim_mm``, and exactly 0 from ``rim_mm`` on. Where the weight is 0
the output is the input value itself (bit-identical); nothing outside the rim is clipped, rescaled or
reconstructed (the original replaced the whole CT by a VQ reconstruction clipped to [-1000, 1000]). The rim is
thin on purpose (default 2 mm, ``inference.rim_mm``): every changed voxel that is not labelled lesion is label
noise for a segmentation model trained on the result, so the rim only hides the seam. On a grid coarser than the
rim (e.g. 3 mm voxels) only lesion voxels change.

The VQ reconstruction can be offset from the CT by a few HU; with ``match_surroundings`` the median difference
between CT and reconstruction over a shell just outside the lesion (up to ``rim_mm`` plus one voxel) is added to
the decoded crop first, so the seam does not show (the original's unused v1 paste matched means similarly).
The shell is only read, never written.

Output dtype: the input's class. A float input keeps its dtype; an unscaled integer input keeps its dtype when
it holds [-1000, 1000] HU, else int16; a scaled integer input (slope/intercept) becomes int16 when every value
is an integer in range, else float32 (written values are then exact HU; :func:`ldm.data.volume.write_volume`
writes slope 1). This applies to the standardised-grid file; on the user's grid see :mod:`inference.source_grid`.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from ldm.data.crops import CropWindow
from ldm.data.intensity import HU_KNOTS
from ldm.data.volume import Geometry

INT16 = np.iinfo(np.int16)
DEFAULT_RIM_MM = 2.0


def lesion_distance_mm(lesion: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Euclidean distance in mm of every voxel to the nearest voxel of the boolean ``lesion`` (0 inside it)."""
    return ndimage.distance_transform_edt(~np.asarray(lesion, dtype=bool), sampling=[float(s) for s in spacing])


def blend_weights(lesion: np.ndarray, rim_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Float32 weights in [0, 1] of the same shape as the boolean ``lesion`` (module docstring rule); ``spacing``
    is the voxel size in mm along the array's axes."""
    lesion = np.asarray(lesion, dtype=bool)
    if not lesion.any():
        return np.zeros(lesion.shape, dtype=np.float32)
    distance = lesion_distance_mm(lesion, spacing)
    weights = np.zeros(lesion.shape, dtype=np.float64)
    weights[lesion] = 1.0
    if rim_mm > 0:
        band = ~lesion & (distance < rim_mm)
        weights[band] = 0.5 * (1.0 + np.cos(math.pi * distance[band] / rim_mm))
    return weights.astype(np.float32)


def lesion_region(lesions: np.ndarray, rim_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Boolean mask of every voxel a paste around ``lesions`` may change: the lesions and every voxel closer than
    ``rim_mm`` to them."""
    lesions = np.asarray(lesions, dtype=bool)
    if not lesions.any():
        return lesions.copy()
    return lesions | (lesion_distance_mm(lesions, spacing) < rim_mm)


def surroundings_offset(original: np.ndarray, generated: np.ndarray, lesion: np.ndarray, rim_mm: float,
                        spacing: Sequence[float]) -> float:
    """Median of ``original - generated`` (HU) over the shell outside ``lesion`` up to ``rim_mm`` plus one voxel;
    0.0 when that shell is empty."""
    distance = lesion_distance_mm(lesion, spacing)
    shell = ~np.asarray(lesion, dtype=bool) & (distance <= rim_mm + max(float(s) for s in spacing))
    if not shell.any():
        return 0.0
    return float(np.median(original[shell] - generated[shell]))


def paste_generated(volume: np.ndarray, generated: np.ndarray, lesion: np.ndarray, window: CropWindow,
                    rim_mm: float, spacing: Sequence[float], match_surroundings: bool = True,
                    unblended: np.ndarray | None = None) -> float:
    """Blend the generated crop (HU, crop shape) into ``volume`` (HU, modified in place) around ``lesion`` (bool,
    crop shape) where the crop was taken; ``spacing``: voxel size in mm ``(z, y, x)``. ``unblended`` (optional,
    same shape as ``volume``) receives the generated values themselves wherever the weight is above 0, for a
    blend done again on another grid (:mod:`inference.source_grid`). Returns the HU offset applied to the
    generated values."""
    crop = window.crop_slices()
    lesion = np.asarray(lesion, dtype=bool)[crop]
    weights = blend_weights(lesion, rim_mm, spacing)
    generated = np.asarray(generated, dtype=np.float64)[crop]
    target = volume[window.volume_slices()]
    original = target.astype(np.float64)
    offset = surroundings_offset(original, generated, lesion, rim_mm, spacing) if match_surroundings else 0.0
    changed = weights > 0
    blended = original[changed] + weights[changed] * (generated[changed] + offset - original[changed])
    target[changed] = blended.astype(volume.dtype)
    if unblended is not None:
        unblended[window.volume_slices()][changed] = (generated[changed] + offset).astype(unblended.dtype)
    return offset


def rim_voxels(rim_mm: float, spacing: Sequence[float]) -> tuple[int, ...]:
    """Per axis, how many voxels beyond the lesion the rim can reach (``ceil(rim_mm / spacing)``, at least 0)."""
    return tuple(max(int(math.ceil(rim_mm / float(s) - 1e-9)), 0) for s in spacing)


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
