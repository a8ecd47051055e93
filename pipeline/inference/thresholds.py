"""Turning LMNet's continuous sample into one binary lesion: the threshold choice.

For each threshold (highest first) the sample is binarised inside the lesion box, voxels already taken by other
lesions (and a one-voxel gap around them) are removed, and the largest face-connected component is kept. The
threshold whose component volume is closest to a **target volume** wins (ties go to the higher threshold).

Target: the original matched the volume of the whole box, which only a cuboid fills; a sample must then spill into
the box corners, so the choice drifts to the lowest thresholds and ragged, over-filled masks. Here the default
target (``fill_target: ellipsoid``) is the volume of the ellipsoid inscribed in the box, ``pi / 6`` (52 %) of the
box: what a round lesion whose bounding box is the box occupies. ``fill_target: box`` restores the original.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from ldm.data.components import FACE_CONNECTIVITY

FILL_FRACTIONS = {"ellipsoid": math.pi / 6, "box": 1.0}
GAP = ndimage.generate_binary_structure(3, 3)  # keep lesions one voxel apart in every direction


@dataclass(frozen=True)
class Candidate:
    """A binary lesion chosen from one sample: the mask (crop shape), its threshold and volume in voxels."""

    mask: np.ndarray
    threshold: float
    voxels: int
    target_voxels: float

    @property
    def fill(self) -> float:
        """Volume relative to the target (1.0 = exactly the target)."""
        return self.voxels / self.target_voxels if self.target_voxels else 0.0


def target_volume(box_voxels: int, fill_target: str) -> float:
    """Target lesion volume in voxels for a box of ``box_voxels`` voxels."""
    return FILL_FRACTIONS[fill_target] * float(box_voxels)


def largest_component_or_empty(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component of ``mask`` (all False when ``mask`` is empty)."""
    components, count = ndimage.label(mask, structure=FACE_CONNECTIVITY)
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def blocked_region(occupied: np.ndarray) -> np.ndarray:
    """Voxels a new lesion may not use: earlier lesions and the voxels touching them (26-neighbourhood)."""
    occupied = np.asarray(occupied, dtype=bool)
    return ndimage.binary_dilation(occupied, structure=GAP) if occupied.any() else occupied


def choose_threshold(sample: np.ndarray, box: np.ndarray, blocked: np.ndarray, thresholds: Sequence[float],
                     fill_target: str = "ellipsoid", fill_holes: bool = True) -> Candidate:
    """The candidate lesion of ``sample`` (module docstring rule); arrays share one shape (the crop).

    ``box``: the lesion box (bool); ``blocked``: voxels taken by other lesions (see :func:`blocked_region`).
    ``fill_holes`` fills enclosed cavities of the chosen mask (solid lesions have none). The mask may be empty.
    """
    allowed = np.asarray(box, dtype=bool) & ~np.asarray(blocked, dtype=bool)
    target = target_volume(int(np.count_nonzero(box)), fill_target)
    best: Candidate | None = None
    for threshold in sorted(thresholds, reverse=True):
        mask = largest_component_or_empty((sample > threshold) & allowed)
        if fill_holes and mask.any():
            mask = ndimage.binary_fill_holes(mask) & allowed
        voxels = int(mask.sum())
        if best is None or abs(voxels - target) < abs(best.voxels - target):
            best = Candidate(mask, float(threshold), voxels, target)
    return best
