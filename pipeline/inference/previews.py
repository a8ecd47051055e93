"""PNG previews of inference results: for every lesion, axial, coronal and sagittal planes through its centre.

One figure row per lesion and volume (e.g. ``input`` and ``inpainted``), columns axial/coronal/sagittal, a
window of the CT around the lesion, grey levels in a soft-tissue HU window, the lesion outlined. Voxels are drawn
with their physical aspect ratio. Uses the drawing helpers of :mod:`ldm.previews` (Agg canvas, atomic writes).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ldm.data.crops import mask_bbox
from ldm.previews import PANEL_INCHES, VIEWS, outline_mask, save_figure, lesion_centre, orthogonal_slices

SOFT_TISSUE_HU = (-160.0, 240.0)
MIN_HALF_WIDTH = 24
# Each panel shows the lesion with this much context: half-width = max(MIN_HALF_WIDTH, CONTEXT * lesion extent).
CONTEXT = 1.5
# (row axis, column axis) of each view's slice in (z, y, x) terms, for the pixel aspect ratio.
VIEW_AXES = {"axial": (1, 2), "coronal": (0, 2), "sagittal": (0, 1)}


def _window(mask: np.ndarray, centre: Sequence[int]) -> tuple[slice, slice, slice]:
    """A box around the lesion (clipped to the volume), ``(z, y, x)`` slices."""
    extent = max(box.stop - box.start for box in mask_bbox(mask))
    half = max(MIN_HALF_WIDTH, int(CONTEXT * extent))
    return tuple(slice(max(c - half, 0), min(c + half + 1, size)) for c, size in zip(centre, mask.shape))


def write_lesion_preview(path: str | os.PathLike, volumes: Mapping[str, np.ndarray], lesions: Sequence[np.ndarray],
                         spacing_zyx: Sequence[float], title: str = "",
                         hu_window: tuple[float, float] = SOFT_TISSUE_HU, dpi: int = 90) -> Path:
    """Write the preview PNG (module docstring) for ``volumes`` (name -> HU ``(z, y, x)``, equal shapes) and the
    boolean lesion masks ``lesions`` (same shape); returns the written path."""
    if not lesions:
        raise ValueError("a lesion preview needs at least one lesion mask")
    rows = [(index, name) for index in range(len(lesions)) for name in volumes]
    figure = Figure(figsize=(PANEL_INCHES * len(VIEWS), PANEL_INCHES * len(rows) + (0.4 if title else 0.0)))
    FigureCanvasAgg(figure)
    grid = figure.subplots(len(rows), len(VIEWS), squeeze=False)
    for row, (index, name) in enumerate(rows):
        mask = np.asarray(lesions[index], dtype=bool)
        centre = lesion_centre(mask, mask.shape)
        window = _window(mask, centre)
        local_centre = [c - w.start for c, w in zip(centre, window)]
        images = orthogonal_slices(np.asarray(volumes[name], dtype=np.float32)[window], local_centre)
        outlines = orthogonal_slices(mask[window].astype(np.float32), local_centre)
        for column, view in enumerate(VIEWS):
            axes = grid[row][column]
            rows_axis, columns_axis = VIEW_AXES[view]
            axes.imshow(images[view], cmap="gray", vmin=hu_window[0], vmax=hu_window[1], origin="lower",
                        interpolation="nearest", aspect=spacing_zyx[rows_axis] / spacing_zyx[columns_axis])
            outline_mask(axes, outlines[view])
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title(view, fontsize=9)
            if column == 0:
                axes.set_ylabel(f"lesion {index}: {name}", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return save_figure(figure, Path(path), dpi)
