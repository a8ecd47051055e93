"""Bringing the lesions back onto the grid of the CT the user gave, changing nothing else in that file.

The models work on the standardised grid ``preprocess.py`` made (LPS, ``--spacing`` mm); a segmentation data set
needs the synthetic CT on the **user's** grid, so that the user's own labels and every other file of the case still
line up. Only the lesion region is brought back:

1. the lesions LINet inpainted (standardised grid) are sampled onto the user's grid by nearest neighbour in world
   coordinates: a user voxel is lesion when the standardised voxel nearest to its centre is;
2. the inpainted standardised CT is sampled linearly (world coordinates) at the user's voxel centres, in a box
   around those lesions only;
3. the blend of :mod:`inference.paste` (weight 1 in the lesion, a raised cosine over ``rim_mm``, 0 beyond) is
   computed **on the user's grid with its own spacing**, so nothing farther than the rim changes at any spacing;
4. the user's file is copied as stored (its raw array, header, data type, ``scl_slope``/``scl_inter``, qform and
   sform with their codes) and only voxels of weight > 0 are re-encoded with the file's own scaling (rounded and
   clipped for integer types). Every voxel beyond the rim is bit-identical to the user's file.

The label beside it holds 0 background, 1 organ (the organs LMNet's mask marked), 2 lesion (step 1), uint8, on the
same grid (the original label convention), ready for a segmentation data set.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ldm.data.volume import Geometry, read_geometry
from ldm.errors import DataError
from ldm.fileio import atomic_path
from inference.paste import blend_weights, rim_voxels

ORGAN_VALUE, LESION_VALUE = 1, 2


@dataclass(frozen=True)
class SourceGridResult:
    """What was written on the user's grid: the CT, its label, and how many voxels of the CT changed."""

    image: Path
    label: Path
    changed_voxels: int
    lesion_voxels: int


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the file axes ``(i, j, k)`` of ``affine`` (oblique grids included)."""
    return tuple(float(size) for size in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def _load_source(path: str | os.PathLike) -> nib.Nifti1Image:
    read_geometry(path)  # DataError naming the file when it is missing, unreadable or not 3D
    return nib.load(str(path))


def nearest_on_source_grid(array_std: np.ndarray, std_geometry: Geometry, source_affine: np.ndarray,
                           source_shape) -> np.ndarray:
    """An integer ``(z, y, x)`` array on ``std_geometry`` sampled by nearest neighbour (world coordinates) onto the
    source grid; returned in the source file's order ``(i, j, k)``, 0 outside the standardised field of view."""
    source_to_std = np.linalg.inv(std_geometry.affine) @ source_affine
    array_file = np.ascontiguousarray(std_geometry.to_file(np.asarray(array_std)))
    return ndimage.affine_transform(array_file, source_to_std[:3, :3], offset=source_to_std[:3, 3],
                                    output_shape=tuple(source_shape), order=0, mode="grid-constant", cval=0)


def _box_coordinates(box: tuple[slice, ...], source_to_std: np.ndarray) -> np.ndarray:
    """Standardised-grid voxel coordinates ``(3, *box shape)`` of the source voxels of ``box``."""
    grids = np.meshgrid(*[np.arange(b.start, b.stop, dtype=np.float64) for b in box], indexing="ij")
    points = np.stack([*grids, np.ones_like(grids[0])]).reshape(4, -1)
    return (source_to_std @ points)[:3].reshape((3, *grids[0].shape))


def _encode(hu: np.ndarray, dtype: np.dtype, slope: float, inter: float) -> np.ndarray:
    """HU values as the stored numbers of a file with ``dtype`` and scaling ``slope``/``inter``."""
    stored = (np.asarray(hu, dtype=np.float64) - inter) / slope
    if np.issubdtype(dtype, np.integer):
        limits = np.iinfo(dtype)
        stored = np.clip(np.rint(stored), limits.min, limits.max)
    return stored.astype(dtype)


def _save_like(path: Path, source: nib.Nifti1Image, data: np.ndarray, slope: float, inter: float) -> Path:
    """Write ``data`` (stored numbers, the source's array shape) with a copy of the source's header, atomically."""
    header = source.header.copy()
    header.set_data_dtype(data.dtype)
    image = source.__class__(data.reshape(source.shape), None, header)
    image.header.set_slope_inter(slope, inter)
    with atomic_path(path) as temporary:
        nib.save(image, str(temporary))
    return path


def write_on_source_grid(source_path: str | os.PathLike, std_geometry: Geometry, inpainted_std: np.ndarray,
                         label_std: np.ndarray, rim_mm: float, image_path: str | os.PathLike,
                         label_path: str | os.PathLike) -> SourceGridResult:
    """Write the CT of ``source_path`` with the lesions of ``label_std`` (value 2) taken from ``inpainted_std``
    (HU), and its 0/1/2 label, on the source's grid (module docstring). ``inpainted_std`` and ``label_std`` are
    ``(z, y, x)`` arrays on ``std_geometry``; ``rim_mm``: blend rim in mm. Returns what was written."""
    source = _load_source(source_path)
    proxy = source.dataobj
    slope, inter = float(proxy.slope), float(proxy.inter)
    stored = np.array(proxy.get_unscaled(), copy=True)
    shape = tuple(int(s) for s in source.shape[:3])
    stored = stored.reshape(shape)
    source_to_std = np.linalg.inv(std_geometry.affine) @ source.affine
    label = nearest_on_source_grid(np.asarray(label_std, dtype=np.uint8), std_geometry, source.affine, shape)
    label = np.where(label == LESION_VALUE, LESION_VALUE, np.where(label > 0, ORGAN_VALUE, 0)).astype(np.uint8)
    lesion = label == LESION_VALUE
    changed = 0
    if lesion.any():
        spacing = voxel_sizes(source.affine)
        margin = rim_voxels(rim_mm, spacing)
        box = tuple(slice(max(b.start - m - 1, 0), min(b.stop + m + 1, n)) for b, m, n in
                    zip(ndimage.find_objects(lesion.astype(np.int8))[0], margin, shape))
        weights = blend_weights(lesion[box], rim_mm, spacing)
        inpainted_file = np.ascontiguousarray(std_geometry.to_file(np.asarray(inpainted_std, dtype=np.float32)))
        generated = ndimage.map_coordinates(inpainted_file, _box_coordinates(box, source_to_std), order=1,
                                            mode="nearest")
        touched = weights > 0
        original = stored[box][touched].astype(np.float64) * slope + inter
        blended = original + weights[touched] * (generated[touched] - original)
        new_values = _encode(blended, stored.dtype, slope, inter)
        window = stored[box]
        changed = int(np.count_nonzero(new_values != window[touched]))
        window[touched] = new_values
    image_path, label_path = Path(image_path), Path(label_path)
    _save_like(image_path, source, stored, slope, inter)
    _save_like(label_path, source, label, 1.0, 0.0)
    return SourceGridResult(image_path, label_path, changed, int(lesion.sum()))



def measure_changes(source_path: str | os.PathLike, output_path: str | os.PathLike,
                    label_path: str | os.PathLike) -> dict:
    """How an output differs from its input on one grid: lesion voxels (label 2), changed voxels inside and outside
    the lesion, the largest distance (mm) of a changed voxel from the lesion and the largest |HU change| outside
    it. Every changed voxel outside the lesion is label noise for a segmentation model."""
    source, output, label = (nib.load(str(path)) for path in (source_path, output_path, label_path))
    if not (source.shape == output.shape == label.shape and np.allclose(source.affine, output.affine)
            and np.allclose(source.affine, label.affine)):
        raise DataError(f"{output_path}: the CT, its output and the label must share one voxel grid")
    before, after = source.get_fdata(dtype=np.float64), output.get_fdata(dtype=np.float64)
    lesion = np.asanyarray(label.dataobj).reshape(before.shape) == LESION_VALUE
    changed = before != after
    outside = changed & ~lesion
    spacing = voxel_sizes(source.affine)
    distance = ndimage.distance_transform_edt(~lesion, sampling=spacing) if lesion.any() else np.zeros(lesion.shape)
    return {"grid": [int(s) for s in source.shape], "spacing_mm": [round(s, 3) for s in spacing],
            "lesion_voxels": int(lesion.sum()), "changed_in_lesion": int((changed & lesion).sum()),
            "changed_outside_lesion": int(outside.sum()),
            "max_distance_mm": round(float(distance[outside].max(initial=0.0)), 2),
            "max_abs_hu_outside": round(float(np.abs(after - before)[outside].max(initial=0.0)), 1)}
