"""Loading one case (CT, lesion label, organ segmentations, report) into aligned ``(z, y, x)`` arrays.

Checks done here, each failing with a DataError that names the file:

- every volume is a readable 3D NIfTI (:mod:`ldm.data.volume`);
- the label holds only 0 (background), 1 (organ, unused) and 2 (lesion), and at least one lesion voxel;
- a v1 segmentation holds ids <= 104 (a TotalSegmentator 2.x file needs ``seg_version: v2``, converted by name);
- all arrays share one voxel grid: the label and segmentations are compared with the image (or with the label
  when no image is loaded); a difference of at most 3 voxels per axis is nearest-resized as in the original
  loader, more is an error.

With a target spacing, every volume is first resampled from its own spacing (linear for the CT, nearest for
label maps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ldm.data.attributes import read_report
from ldm.data.organs import NUM_V1_CLASSES, to_v1
from ldm.data.resample import match_shape, respace
from ldm.data.volume import read_label, read_volume
from ldm.errors import DataError

LESION_VALUE = 2
LABEL_VALUES = (0, 1, 2)


@dataclass
class LoadedCase:
    """One case in memory. Arrays are ``(z, y, x)`` on one grid of ``spacing`` mm; absent inputs are ``None``."""

    paths: dict[str, str]
    label: np.ndarray
    spacing: tuple[float, float, float]
    image: np.ndarray | None = None
    seg: np.ndarray | None = None
    coarseg: np.ndarray | None = None
    report: dict | None = None

    @property
    def lesion(self) -> np.ndarray:
        """Boolean mask of every lesion voxel (label value 2)."""
        return self.label == LESION_VALUE


def _check_label(label: np.ndarray, path: str) -> None:
    low, high = int(label.min(initial=0)), int(label.max(initial=0))
    if low < min(LABEL_VALUES) or high > max(LABEL_VALUES):
        raise DataError(f"{path}: label values {low}..{high}; expected 0 (background), 1 (organ) and 2 (lesion)")
    if not np.any(label == LESION_VALUE):
        raise DataError(f"{path}: the label holds no lesion voxel (value {LESION_VALUE})")


def _read_segmentation(path: str, seg_version: str, target_spacing: Sequence[float] | None) -> tuple[np.ndarray, tuple]:
    segmentation, geometry = read_label(path)
    if seg_version == "v1" and int(segmentation.max(initial=0)) > NUM_V1_CLASSES:
        raise DataError(
            f"{path}: organ ids up to {int(segmentation.max())} but TotalSegmentator v1 has {NUM_V1_CLASSES} "
            "classes; set seg_version: v2 for a TotalSegmentator 2.x segmentation"
        )
    try:
        segmentation = to_v1(segmentation, seg_version)
    except DataError as error:
        raise DataError(f"{path}: {error}") from None
    return _respaced(segmentation, geometry.spacing_zyx, target_spacing, order=0)


def _respaced(array: np.ndarray, spacing: tuple, target_spacing: Sequence[float] | None,
              order: int) -> tuple[np.ndarray, tuple]:
    if target_spacing is None:
        return array, tuple(spacing)
    return respace(array, spacing, target_spacing, order=order), tuple(target_spacing)


def load_case(paths: dict[str, str], need_image: bool, seg_version: str = "v1",
              target_spacing: Sequence[float] | None = None) -> LoadedCase:
    """Read the files of one case (``paths`` keys: image, label and optionally type, seg, coarseg).

    Returns a :class:`LoadedCase`: the image in HU (float32) when ``need_image``; label and v1 segmentations
    as int16; the validated report dict. ``target_spacing`` (mm, ``(z, y, x)``) resamples every volume.
    """
    label, label_geometry = read_label(paths["label"])
    label, spacing = _respaced(label, label_geometry.spacing_zyx, target_spacing, order=0)
    reference, reference_shape = f"the label {paths['label']}", label.shape
    image = None
    if need_image:
        image, image_geometry = read_volume(paths["image"], dtype=np.float32)
        image, spacing = _respaced(image, image_geometry.spacing_zyx, target_spacing, order=1)
        reference, reference_shape = f"the image {paths['image']}", image.shape
        label = match_shape(label, reference_shape, paths["label"], reference)
    _check_label(label, paths["label"])
    segmentations = {}
    for name in ("seg", "coarseg"):
        if paths.get(name):
            segmentation, _ = _read_segmentation(paths[name], seg_version, target_spacing)
            segmentations[name] = match_shape(segmentation, reference_shape, paths[name], reference)
    report = read_report(paths["type"]) if paths.get("type") else None
    return LoadedCase(paths=dict(paths), label=label, spacing=spacing, image=image, report=report, **segmentations)
