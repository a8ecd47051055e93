"""``quality.png``: requested versus measured mean HU and size, one dot per lesion, coloured by the overall verdict.

Left: the report's ``CT value`` against the mean HU of the lesion's interior (what the ``hu`` check compares),
with the identity line and the ``hu_abs`` band.
Right: size as the equivalent-sphere diameter (mm), ``(6 V / pi)^(1/3)``: for the request, V is the ellipsoid
inscribed in the report's size (its diameter is the geometric mean of the three axes in mm); the band is the
``volume_ratio`` tolerance. Lesions that passed every check are green dots, the others red crosses; a lesion
failing the panel's own checks (hu/density, volume/extent) is labelled ``case:lesion`` (at most
:data:`MAX_LABELS` per panel). Lesions without the requested value are left out of that panel (counted in its
title). Drawn with matplotlib's Agg canvas (no display needed).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ldm.previews import save_figure
from quality.measure import LesionQuality
from quality.tolerances import Tolerances

MAX_LABELS = 12
PASS_STYLE = dict(color="#1a9850", marker="o", s=28, label="passed")
FAIL_STYLE = dict(color="#d73027", marker="x", s=36, label="failed")


def equivalent_diameter_mm(volume_mm3: float) -> float:
    """Diameter (mm) of the sphere of ``volume_mm3``."""
    return (6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0)


def _panel(axes, points: list[tuple[float, float, LesionQuality]], total: int, band: tuple[float, float],
           relative: bool, checks: tuple[str, ...], labels: tuple[str, str, str]) -> None:
    """Scatter ``(requested, measured, lesion)``; the band is ``x + band`` or, with ``relative``, ``x * band``;
    lesions failing one of ``checks`` are labelled; ``labels``: x label, y label, title."""
    xlabel, ylabel, title = labels
    axes.set_title(f"{title} ({len(points)} of {total} lesions)", fontsize=10)
    axes.set_xlabel(xlabel, fontsize=9)
    axes.set_ylabel(ylabel, fontsize=9)
    axes.grid(True, alpha=0.3)
    if not points:
        axes.text(0.5, 0.5, "nothing requested", ha="center", va="center", transform=axes.transAxes)
        return
    values = np.array([[x, y] for x, y, _ in points])
    low, high = float(values.min()), float(values.max())
    pad = max(0.08 * (high - low), 1.0)
    line = np.linspace(max(low - pad, 0.0) if relative else low - pad, high + pad, 50)
    lower, upper = (line * band[0], line * band[1]) if relative else (line + band[0], line + band[1])
    axes.fill_between(line, lower, upper, color="0.85", label="tolerance")
    axes.plot(line, line, color="0.3", linestyle="--", linewidth=1, label="measured = requested")
    for style, verdict in ((PASS_STYLE, True), (FAIL_STYLE, False)):
        chosen = [(x, y) for x, y, lesion in points if lesion.passed is verdict]
        if chosen:
            axes.scatter(*zip(*chosen), **style)
    failed = [(x, y, lesion) for x, y, lesion in points if set(lesion.failed_checks) & set(checks)][:MAX_LABELS]
    for x, y, lesion in failed:
        axes.annotate(f"{lesion.case}:{lesion.lesion}", (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    axes.set_xlim(line[0], line[-1])
    axes.set_ylim(min(line[0], float(lower.min())), max(line[-1], float(upper.max())))


def plot_quality(lesions: Sequence[LesionQuality], tolerances: Tolerances, path: str | Path, dpi: int = 90) -> Path:
    """Write the two-panel plot (module docstring) to ``path``; returns it."""
    figure = Figure(figsize=(10.0, 4.6))
    FigureCanvasAgg(figure)
    hu_axes, size_axes = figure.subplots(1, 2)
    hu_points = [(lesion.requested_hu, lesion.interior_mean_hu, lesion) for lesion in lesions
                 if lesion.requested_hu is not None]
    size_points = [(equivalent_diameter_mm(lesion.requested_volume_mm3), equivalent_diameter_mm(lesion.volume_mm3),
                    lesion) for lesion in lesions if lesion.requested_volume_mm3 is not None]
    _panel(hu_axes, hu_points, len(lesions), (-tolerances.hu_abs, tolerances.hu_abs), False, ("hu", "density"),
           ("requested CT value (HU)", "measured mean of the lesion's interior (HU)", "Lesion HU"))
    ratios = tuple(ratio ** (1.0 / 3.0) for ratio in tolerances.volume_ratio)
    _panel(size_axes, size_points, len(lesions), ratios, True, ("volume", "extent"),
           ("requested size: ellipsoid, equivalent diameter (mm)", "measured equivalent diameter (mm)", "Lesion size"))
    passed = sum(lesion.passed for lesion in lesions)
    figure.suptitle(f"Quality of synthetic lesions: {passed} of {len(lesions)} passed every check", fontsize=11)
    handles = {label: handle for axes in (hu_axes, size_axes)
               for handle, label in zip(*axes.get_legend_handles_labels())}
    if handles:
        figure.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=8,
                      frameon=False)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(figure, Path(path), dpi)
