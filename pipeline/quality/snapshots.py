"""A small before/after picture of one lesion: the axial slice through its centre on the input and on the inpainted
CT, lesion outlined, soft-tissue window (-160..240 HU), as PNG bytes for ``review.html``."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ldm.previews import lesion_centre, outline_mask

WINDOW_HU = (-160.0, 240.0)


def before_after_png(before: np.ndarray, after: np.ndarray, lesion: np.ndarray, spacing_zyx: Sequence[float],
                     dpi: int = 72) -> bytes:
    """PNG bytes of the axial slices of ``before`` and ``after`` (``(z, y, x)`` HU) through ``lesion``'s centre."""
    z = lesion_centre(lesion, lesion.shape)[0]
    figure = Figure(figsize=(4.4, 2.3))
    FigureCanvasAgg(figure)
    aspect = float(spacing_zyx[1]) / float(spacing_zyx[2])
    for axes, volume, title in zip(figure.subplots(1, 2), (before, after), ("before", "after")):
        axes.imshow(volume[z], cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=aspect,
                    interpolation="nearest")
        outline_mask(axes, lesion[z].astype(np.float32))
        axes.set_title(title, fontsize=9)
        axes.set_axis_off()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
