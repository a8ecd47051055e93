"""Describe every lesion of a label map on its CT, as ``prepare_dataset.py`` would write its report (``describe.py``).

Inputs are read on the user's own grid and orientation (any NIfTI dtype; scaled values are HU after the header's
slope and intercept) and never written. Lesions are the face-connected components of ``label == lesion_label``,
largest first (:func:`ldm.data.components.ranked_components`). The organ each is described in: ``--organ``, else
the segmented organ holding most of it. The organ's voxels come from the segmentation (TotalSegmentator v1 or
v2 ids), or, without one, from the label's value 1 (the original 0/1/2 convention) with ``--organ`` naming it.
Each lesion gets a ``type.json`` dict in the original format (one entry keyed by the organ's v1 id, size along
the file's axes) and the measurements behind every phrase (:class:`ldm.lesion.LesionMeasurement`, units in the
names).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldm.data.components import ranked_components, voxel_volume_mm3
from ldm.data.organs import ORGAN_TYPE_FILE, organ_id as organ_id_of
from ldm.data.organs import organ_name, to_v1
from ldm.data.volume import Geometry, read_label, read_volume
from ldm.errors import DataError
from ldm.lesion import LesionDescription, describe_lesion, organ_voxels
from preparation.case import GRID_ATOL_MM
from preprocessing.report_format import CT_VALUE, build_report

ORGAN_VALUE = 1


@dataclass
class DescribedLesion:
    """One lesion: its rank (0 = largest), the report the scan supports and the description behind it."""

    rank: int
    report: dict[str, list]
    description: LesionDescription

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly: rank, organ, report, measurements, undecided attributes."""
        return {"lesion": self.rank, "organ": organ_name(self.description.organ_id),
                "organ_id": self.description.organ_id, "report": self.report,
                "measurements": self.description.measurement.as_dict(),
                "undecided": list(self.description.phrases.undecided)}


def _same_grid(ct: Geometry, other: Geometry, path: Path) -> None:
    if other.shape != ct.shape or not np.allclose(other.affine, ct.affine, atol=GRID_ATOL_MM):
        raise DataError(f"{path}: its voxel grid (shape {other.shape}) differs from the CT's ({ct.source}, shape "
                        f"{ct.shape}, or another affine); it must be drawn on the CT's grid")


def _organ_extent_xyz(organ: np.ndarray, file_axes: tuple[int, ...]) -> tuple[int, int, int]:
    where = [np.flatnonzero(organ.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    extent = [int(w[-1] - w[0] + 1) for w in where]
    return tuple(extent[axis] for axis in file_axes)


def _organ(name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return organ_id_of(name)
    except DataError as error:
        raise DataError(f"--organ: {error} (organ names: {ORGAN_TYPE_FILE})") from None


def describe_files(ct_path: str | os.PathLike, label_path: str | os.PathLike, seg_path: str | os.PathLike | None = None,
                   seg_version: str = "v1", lesion_label: int = 2, organ: str | None = None) -> list[DescribedLesion]:
    """Every lesion of ``label_path`` described on ``ct_path`` (module docstring); DataError naming the file for a
    label without lesion voxels, a label or segmentation on another grid, a segmentation without the organ or an
    unknown organ name."""
    ct_path, label_path = Path(ct_path), Path(label_path)
    wanted = _organ(organ)
    ct, geometry = read_volume(ct_path, dtype=np.float32)
    label, label_geometry = read_label(label_path)
    _same_grid(geometry, label_geometry, label_path)
    lesions = label == lesion_label
    if not lesions.any():
        values = ", ".join(str(int(v)) for v in np.unique(label))
        raise DataError(f"{label_path}: no lesion voxel (value {lesion_label}); its values are {values}")
    if seg_path is not None:
        seg, seg_geometry = read_label(seg_path)
        _same_grid(geometry, seg_geometry, Path(seg_path))
        seg = to_v1(seg, seg_version)
        if wanted is not None and not (organ_voxels(seg, wanted) & ~lesions).any():
            raise DataError(f"{seg_path}: the segmentation holds no {organ_name(wanted)} voxel outside the lesions")
        organ_mask = None
    else:
        if wanted is None:
            raise DataError(f"{label_path}: without --seg, name the organ the lesions lie in with --organ")
        organ_mask = label == ORGAN_VALUE
        if not organ_mask.any():
            raise DataError(f"{label_path}: without --seg the organ is the label's value {ORGAN_VALUE}, and it has "
                            "none; give the organ segmentation with --seg")
        seg = np.where(organ_mask | lesions, wanted, 0).astype(np.int16)
    file_axes = geometry.memory_axes
    components, ranked, _ = ranked_components(lesions)
    described = []
    for rank, component in enumerate(ranked):
        lesion = components == component
        try:
            description = describe_lesion(ct, lesion, seg, geometry.spacing_zyx, wanted,
                                          voxel_volume_mm3(geometry.affine), file_axes, lesions=lesions,
                                          organ=organ_mask)
        except DataError as error:
            raise DataError(f"{seg_path or label_path}: lesion {rank}: {error}") from None
        organ_with_lesion = organ_voxels(seg, description.organ_id) | lesion
        values = {**description.phrases.values, CT_VALUE: round(description.measurement.interior_mean_hu)}
        report = build_report(description.organ_id, values, _organ_extent_xyz(organ_with_lesion, file_axes),
                              description.measurement.size_vox)
        described.append(DescribedLesion(rank, report, description))
    return described
