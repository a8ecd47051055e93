"""NIfTI volumes in memory as ``(z, y, x)`` arrays in one canonical orientation, written back on the file's own grid.

Reading reorients the file's voxel array to the canonical axis codes (``LAS``, as the original loader did, so
trained weights see anatomy the way they were trained) and transposes it to ``(z, y, x)``. The
:class:`Geometry` remembers the file's affine, shape and orientation, so :func:`write_volume` undoes both steps
and writes with the file's affine: the output has the input's voxel grid and overlays it exactly in any viewer,
whatever the input orientation (LPS, RAS, LAS, oblique). Reorientation only permutes and flips axes, so the
round trip is exact.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from ldm.data.read_cache import file_cached
from ldm.errors import DataError
from ldm.fileio import atomic_path

CANONICAL_AXCODES = ("L", "A", "S")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
_READ_ERRORS = (ImageFileError, EOFError, OSError, ValueError, zlib.error)


@dataclass(frozen=True)
class Geometry:
    """Where a volume's voxels sit in the world: the file's affine, array shape and header."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    header: nib.Nifti1Header = field(repr=False, compare=False)
    source: str = ""

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """The file's orientation, e.g. ``('L', 'P', 'S')``."""
        return nib.aff2axcodes(self.affine)

    @property
    def _to_canonical(self) -> np.ndarray:
        return ornt_transform(io_orientation(self.affine), axcodes2ornt(CANONICAL_AXCODES))

    @property
    def canonical_affine(self) -> np.ndarray:
        """Affine of the canonical ``(x, y, z)`` array (before the transpose to ``(z, y, x)``)."""
        return self.affine @ inv_ornt_aff(self._to_canonical, self.shape)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel size in mm along the in-memory axes ``(z, y, x)``."""
        sizes = np.sqrt((self.canonical_affine[:3, :3] ** 2).sum(axis=0))
        return tuple(float(s) for s in sizes[::-1])

    @property
    def memory_axes(self) -> tuple[int, int, int]:
        """For each file axis ``(i, j, k)``, the in-memory ``(z, y, x)`` axis holding it."""
        return tuple(2 - int(canonical) for canonical, _ in self._to_canonical)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Shape of the in-memory ``(z, y, x)`` array."""
        permuted = [0, 0, 0]
        for file_axis, (canonical_axis, _) in enumerate(self._to_canonical):
            permuted[int(canonical_axis)] = self.shape[file_axis]
        return tuple(permuted[::-1])

    def to_memory(self, file_array: np.ndarray) -> np.ndarray:
        """File-grid ``(i, j, k)`` array -> canonical ``(z, y, x)`` array (a view when possible)."""
        return apply_orientation(file_array, self._to_canonical).transpose(2, 1, 0)

    def to_file(self, array_zyx: np.ndarray) -> np.ndarray:
        """Canonical ``(z, y, x)`` array -> file-grid ``(i, j, k)`` array; inverse of :meth:`to_memory`."""
        if tuple(array_zyx.shape) != self.shape_zyx:
            raise DataError(
                f"{self.source or 'volume'}: array of shape {tuple(array_zyx.shape)} does not match the "
                f"geometry's (z, y, x) shape {self.shape_zyx}"
            )
        back = ornt_transform(axcodes2ornt(CANONICAL_AXCODES), io_orientation(self.affine))
        return apply_orientation(np.asarray(array_zyx).transpose(2, 1, 0), back)


def _check_nifti_name(path: Path) -> None:
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise DataError(f"{path}: not a NIfTI file name (expected .nii or .nii.gz)")


def _load(path: str | os.PathLike) -> nib.Nifti1Image:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    _check_nifti_name(path)
    try:
        image = nib.load(str(path))
    except _READ_ERRORS as error:
        raise DataError(f"{path}: cannot read as NIfTI ({error})") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{path}: not a NIfTI image ({type(image).__name__})")
    return image


def _geometry(image: nib.Nifti1Image, path: str | os.PathLike) -> Geometry:
    shape = tuple(int(s) for s in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {shape}")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{path}: the affine is singular or not finite")
    return Geometry(affine=affine, shape=shape, header=image.header.copy(), source=str(path))


def read_geometry(path: str | os.PathLike) -> Geometry:
    """Geometry of a NIfTI file without reading its voxels."""
    return _geometry(_load(path), path)


@file_cached
def read_volume(path: str | os.PathLike, dtype: np.dtype | type = np.float32) -> tuple[np.ndarray, Geometry]:
    """Read a NIfTI file; returns the canonical ``(z, y, x)`` array (``dtype``, scaled values) and its Geometry
    (decoded once per file version and dtype in a process: :mod:`ldm.data.read_cache`)."""
    image = _load(path)
    geometry = _geometry(image, path)
    try:
        data = np.asanyarray(image.dataobj)
        data = data.reshape(geometry.shape)
        if np.issubdtype(np.dtype(dtype), np.floating):
            data = data.astype(dtype, copy=False)
    except _READ_ERRORS as error:
        raise DataError(f"{path}: cannot read the voxel data ({error})") from None
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise DataError(f"{path}: the volume holds NaN or infinite values")
    if not np.issubdtype(np.dtype(dtype), np.floating):
        rounded = np.rint(data)
        if np.issubdtype(data.dtype, np.floating) and np.abs(rounded - data).max(initial=0) > 1e-3:
            raise DataError(f"{path}: expected a label map with integer values, found fractional values")
        data = rounded.astype(dtype)
    return np.ascontiguousarray(geometry.to_memory(data)), geometry


def read_label(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read an integer label map (stored as any NIfTI dtype); returns an int16 ``(z, y, x)`` array and Geometry."""
    return read_volume(path, dtype=np.int16)


def write_volume(
    path: str | os.PathLike, array_zyx: np.ndarray, geometry: Geometry, dtype: np.dtype | type | None = None
) -> Path:
    """Write a canonical ``(z, y, x)`` array on the grid of ``geometry`` (same affine and shape), atomically.

    ``dtype`` defaults to the array's dtype. Integer outputs are rounded and clipped to the dtype's range.
    Returns the written path.
    """
    path = Path(path)
    _check_nifti_name(path)
    dtype = np.dtype(dtype or array_zyx.dtype)
    data = geometry.to_file(np.asarray(array_zyx))
    if np.issubdtype(dtype, np.integer):
        limits = np.iinfo(dtype)
        data = np.clip(np.rint(data), limits.min, limits.max)
    data = np.ascontiguousarray(data.astype(dtype))
    header = geometry.header.copy()
    header.set_data_dtype(dtype)
    image = nib.Nifti1Image(data, geometry.affine, header=header)
    image.set_qform(geometry.affine, code=int(header["qform_code"]) or 1)
    image.set_sform(geometry.affine, code=int(header["sform_code"]) or 1)
    image.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as temporary:
        nib.save(image, str(temporary))
    return path
