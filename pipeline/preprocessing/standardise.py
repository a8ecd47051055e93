"""Standardise a CT: reorient to LPS (as the original) and resample to a target spacing with a correct affine.

The original kept the old voxel size in the affine while the data were resampled, and overwrote the input file.
Here the input is only read; the new file has an affine whose voxel axes have exactly the target length (pixdim
and sform agree) and which keeps the volume where it was in the world: the new grid is centred on the old one
(the centre of the field of view is preserved exactly; each edge moves by less than half a target voxel, since the
new voxel count is the old extent divided by the target spacing, rounded). Resampling maps every new voxel
centre through that affine into the old grid, so data and affine cannot disagree. CT intensities use linear
interpolation (order 1); label maps use nearest neighbour (order 0).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from ldm.data.volume import Geometry, read_geometry, write_volume
from ldm.errors import ConfigError, DataError

TARGET_AXCODES = ("L", "P", "S")
INT16_RANGE = (np.iinfo(np.int16).min, np.iinfo(np.int16).max)


def as_spacing_xyz(spacing: float | Sequence[float]) -> tuple[float, float, float]:
    """Target voxel size in mm along the LPS file axes (x, y, z): one number (isotropic) or three."""
    values = [float(spacing)] * 3 if np.isscalar(spacing) else [float(v) for v in spacing]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) <= 0 or not all(np.isfinite(values)):
        raise ConfigError(f"--spacing must be one positive number or three (x y z, mm), got {spacing!r}")
    return tuple(values)


def load_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """A 3D NIfTI image (a 4D file with one volume is cut to 3D); DataError naming the file otherwise."""
    read_geometry(path)
    image = nib.load(str(path))
    return image.slicer[..., 0] if len(image.shape) == 4 else image


def holds_integers(image: nib.Nifti1Image) -> bool:
    """True when the file stores integers without scaling (e.g. int16 HU), so rounding loses nothing it had."""
    slope, inter = image.header.get_slope_inter()
    return np.issubdtype(image.get_data_dtype(), np.integer) and slope in (None, 1.0) and inter in (None, 0.0)


def reorient_lps(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """The image with its voxel array permuted/flipped to LPS axis order (exact; the world positions are unchanged)."""
    transform = ornt_transform(io_orientation(image.affine), axcodes2ornt(TARGET_AXCODES))
    return image.as_reoriented(transform)


def _snap(index_map: np.ndarray) -> np.ndarray:
    """Round entries within 1e-6 of an integer, so pure flips and shifts stay exact for nearest-neighbour lookup."""
    rounded = np.rint(index_map)
    return np.where(np.abs(index_map - rounded) < 1e-6, rounded, index_map)


def respaced_grid(affine: np.ndarray, shape: Sequence[int], spacing_xyz: Sequence[float]
                  ) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray]:
    """The resampled grid: ``(new affine, new shape, index map)``.

    ``index map`` is the 4x4 matrix taking a new voxel index to the old voxel index; ``new affine = affine @ map``.
    """
    old_spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    target = np.asarray(spacing_xyz, dtype=np.float64)
    old_shape = np.asarray(shape, dtype=np.float64)
    new_shape = np.maximum(np.rint(old_shape * old_spacing / target), 1).astype(int)
    step = target / old_spacing
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(step)
    index_map[:3, 3] = ((old_shape - 1) - (new_shape - 1) * step) / 2
    return np.asarray(affine) @ index_map, tuple(int(n) for n in new_shape), index_map


def sample_on_grid(data: np.ndarray, index_map: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Values of ``data`` (same dtype) at ``index_map @ new index`` for every voxel of ``shape``."""
    index_map = _snap(index_map)
    if np.array_equal(index_map, np.eye(4)) and tuple(shape) == data.shape:
        return data.copy()
    # Nearest lookup: a point within half a voxel of the edge still belongs to the edge voxel ("grid-constant").
    edge = "nearest" if order > 0 else "grid-constant"
    return ndimage.affine_transform(data, index_map[:3, :3], offset=index_map[:3, 3], output_shape=tuple(shape),
                                    order=order, mode=edge, cval=0)


def _new_geometry(source: nib.Nifti1Image, affine: np.ndarray, shape: Sequence[int], target: Path) -> Geometry:
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    header["qform_code"] = int(source.header["qform_code"]) or 1
    header["sform_code"] = int(source.header["sform_code"]) or 1
    return Geometry(affine=affine, shape=tuple(int(s) for s in shape), header=header, source=str(target))


def write_file_grid(path: str | os.PathLike, data: np.ndarray, geometry: Geometry, dtype: np.dtype | type) -> Path:
    """Write an array in file order ``(i, j, k)`` on ``geometry`` (atomically, through :func:`write_volume`)."""
    return write_volume(path, geometry.to_memory(data), geometry, dtype=dtype)


def standardise_ct(source: str | os.PathLike, target: str | os.PathLike, spacing_xyz: Sequence[float]) -> Path:
    """Write ``source`` reoriented to LPS and resampled to ``spacing_xyz`` mm (linear) as ``target``; returns it.

    Integer CTs stay int16 (rounded HU); floating CTs are written as float32. ``source`` is never modified.
    """
    target = Path(target)
    original = load_nifti(source)
    integer = holds_integers(original)
    image = reorient_lps(original)
    affine, shape, index_map = respaced_grid(image.affine, image.shape, spacing_xyz)
    values = sample_on_grid(image.get_fdata(dtype=np.float32), index_map, shape, order=1)
    if not np.all(np.isfinite(values)):
        raise DataError(f"{source}: the CT holds NaN or infinite values")
    if integer:
        values = np.clip(np.rint(values), *INT16_RANGE)
    geometry = _new_geometry(image, affine, shape, target)
    return write_file_grid(target, values, geometry, np.int16 if integer else np.float32)


def labels_on_grid(source: str | os.PathLike | nib.Nifti1Image, reference: Geometry, name: str = "") -> np.ndarray:
    """A label map (file or image) resampled by nearest neighbour in world coordinates onto ``reference``'s grid.

    Returns an int32 array in the reference file's order ``(i, j, k)``; voxels outside the label map's field of
    view are 0. ``name`` labels error messages when ``source`` is an in-memory image.
    """
    image = source if isinstance(source, nib.Nifti1Image) else load_nifti(source)
    name = name or str(source)
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{name}: expected a 3D label map, got shape {data.shape}")
    if np.issubdtype(data.dtype, np.floating):
        rounded = np.rint(data)
        if not np.all(np.isfinite(data)) or np.abs(rounded - data).max(initial=0) > 1e-3:
            raise DataError(f"{name}: expected a label map with integer values, found fractional or NaN values")
        data = rounded
    index_map = np.linalg.inv(image.affine) @ reference.affine
    return sample_on_grid(np.asarray(data, dtype=np.int32), index_map, reference.shape, order=0)
