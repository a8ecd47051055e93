"""Preview montages of 3D volumes: axial, coronal and sagittal slices through the lesion, one row per volume.

Volumes are ``(z, y, x)`` arrays in the canonical orientation of :mod:`ldm.data.volume` (``z`` superior, ``y``
anterior, ``x`` towards the patient's left), so every slice is drawn with its first array axis pointing up.
A mask, when given, is outlined (matplotlib contour at 0.5) on every panel. Rendering uses matplotlib's
object-oriented API with the Agg canvas (no pyplot, no display), so it may run in a background thread.
Files are written atomically: a temporary sibling, then ``os.replace``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ldm.data.synthetic_geometry import geometry_for
from ldm.data.volume import write_volume
from ldm.fileio import atomic_path

VIEWS = ("axial", "coronal", "sagittal")
PANEL_INCHES = 2.2
MASK_COLOUR = "#ff3b30"


def as_volume(array) -> np.ndarray:
    """A float32 ``(z, y, x)`` numpy array from a tensor or array with leading axes of size 1 (``[1, D, H, W]``)."""
    if hasattr(array, "detach"):
        array = array.detach().float().cpu().numpy()
    volume = np.asarray(array, dtype=np.float32)
    while volume.ndim > 3 and volume.shape[0] == 1:
        volume = volume[0]
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume (optionally with leading axes of size 1), got shape {volume.shape}")
    return volume


def lesion_centre(mask: np.ndarray | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """Voxel index ``(z, y, x)`` of the centre of mass of ``mask > 0.5``; the volume centre when the mask is empty."""
    if mask is not None:
        coordinates = np.argwhere(np.asarray(mask) > 0.5)
        if len(coordinates):
            return tuple(int(round(c)) for c in coordinates.mean(axis=0))
    return tuple(int(s) // 2 for s in shape)


def orthogonal_slices(volume: np.ndarray, centre: Sequence[int]) -> dict[str, np.ndarray]:
    """The axial ``(y, x)``, coronal ``(z, x)`` and sagittal ``(z, y)`` slices of ``volume`` through ``centre``."""
    z, y, x = (min(max(int(c), 0), s - 1) for c, s in zip(centre, volume.shape))
    return {"axial": volume[z], "coronal": volume[:, y, :], "sagittal": volume[:, :, x]}


def outline_mask(axes, mask_slice: np.ndarray) -> None:
    # contour() warns on a constant field; a slice the mask does not cross has nothing to outline. Without X/Y
    # and origin, contour puts Z[0, 0] at (0, 0): the centre of imshow's first pixel.
    # contour() needs at least 2 x 2 values: a slice of a one-voxel-thin volume is padded with background.
    if mask_slice.min() < 0.5 < mask_slice.max():
        if min(mask_slice.shape) < 2:
            rows, columns = mask_slice.shape
            axes.contour(np.arange(-1, columns + 1), np.arange(-1, rows + 1), np.pad(mask_slice, 1), levels=[0.5],
                         colors=MASK_COLOUR, linewidths=0.9)
        else:
            axes.contour(mask_slice, levels=[0.5], colors=MASK_COLOUR, linewidths=0.9)


def render_montage(volumes: Mapping[str, object], path: str | os.PathLike, mask=None, title: str = "",
                   value_range: tuple[float, float] = (0.0, 1.0), dpi: int = 100) -> Path:
    """Write a PNG montage: one row per entry of ``volumes`` (row label = key), columns axial/coronal/sagittal.

    Every volume must have the same ``(z, y, x)`` shape (tensors or arrays, leading singleton axes allowed).
    Slices go through the centre of ``mask`` (outlined in red on every panel) or the volume centre. Grey levels
    map ``value_range`` to black..white. Returns the written path.
    """
    if not volumes:
        raise ValueError("render_montage needs at least one volume")
    arrays = {name: as_volume(volume) for name, volume in volumes.items()}
    shapes = {array.shape for array in arrays.values()}
    mask_array = as_volume(mask) if mask is not None else None
    if mask_array is not None:
        shapes.add(mask_array.shape)
    if len(shapes) != 1:
        raise ValueError(f"preview volumes and mask must share one shape, got {sorted(shapes)}")
    centre = lesion_centre(mask_array, next(iter(shapes)))
    mask_slices = orthogonal_slices(mask_array, centre) if mask_array is not None else None

    figure = Figure(figsize=(PANEL_INCHES * len(VIEWS), PANEL_INCHES * len(arrays) + (0.4 if title else 0.0)))
    FigureCanvasAgg(figure)
    grid = figure.subplots(len(arrays), len(VIEWS), squeeze=False)
    for row, (name, array) in enumerate(arrays.items()):
        for column, (view, image) in enumerate(orthogonal_slices(array, centre).items()):
            axes = grid[row][column]
            axes.imshow(image, cmap="gray", vmin=value_range[0], vmax=value_range[1], origin="lower",
                        interpolation="nearest")
            if mask_slices is not None:
                outline_mask(axes, mask_slices[view])
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title(view, fontsize=9)
            if column == 0:
                axes.set_ylabel(name, fontsize=9)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return save_figure(figure, Path(path), dpi)


def save_figure(figure: Figure, path: Path, dpi: int) -> Path:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi)
    return path


def write_preview_volumes(volumes: Mapping[str, object], directory: str | os.PathLike, stem: str,
                          spacing_mm: float | Sequence[float] = 1.0) -> list[Path]:
    """Write each volume as ``<directory>/<stem>_<name>.nii.gz`` (float32, axis-aligned grid of ``spacing_mm``).

    Preview crops carry no world position, so the files share one synthetic grid: they overlay each other
    exactly, not the source CT. Returns the written paths.
    """
    spacing = (float(spacing_mm),) * 3 if np.isscalar(spacing_mm) else tuple(float(s) for s in spacing_mm)
    written = []
    for name, volume in volumes.items():
        array = as_volume(volume)
        geometry = geometry_for(array.shape, spacing)
        written.append(write_volume(Path(directory) / f"{stem}_{name}.nii.gz", array, geometry, dtype=np.float32))
    return written
