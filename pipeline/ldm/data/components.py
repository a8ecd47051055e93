"""Lesion components: face-connected regions of a lesion map, ranked largest first, and the volume of a voxel.

Every stage numbers the lesions of a mask the same way (LINet's crops, the quality gate's rows, the dataset's
report, the inference plans): component ``r`` is the ``r``-th largest, ties in scan order (C order of the array
as given). One function does it, so the numbering cannot drift between them.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

FACE_CONNECTIVITY = ndimage.generate_binary_structure(3, 1)


def ranked_components(mask: np.ndarray) -> tuple[np.ndarray, list[int], list[tuple[slice, ...]]]:
    """Face-connected components of the foreground of ``mask``: ``(label array, labels largest first, bounding
    box of each label)``; ``boxes[label - 1]`` are the slices of component ``label``. Ties keep scan order."""
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=FACE_CONNECTIVITY)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    ranked = [int(index) + 1 for index in np.argsort(-sizes, kind="stable")]
    return labels, ranked, ndimage.find_objects(labels)


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel in mm3: ``|det|`` of the affine's 3x3 part (exact for oblique and sheared grids too,
    where the product of the column norms overestimates it)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))
