"""How faithfully a run follows its reports, per attribute: ``fidelity.csv`` and ``fidelity.png``.

``fidelity.csv``: one row per report attribute (:data:`ldm.lesion.ATTRIBUTES`): ``lesions_judged`` (verdict agree or
disagree), ``agreement_rate`` (agree / judged; empty when none was judged), ``agree``, ``disagree``, ``not_applicable``
(n/a, whatever the reason, including "not requested"). ``fidelity.png``: one small confusion matrix per judged
phrase attribute, requested phrase (rows) x measured phrase (columns), lesion counts in the cells (size and CT value
are numbers, drawn requested against measured in ``quality.png``). Lesions that were not
described (no segmentation) count nowhere.
"""
from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ldm.fileio import write_text_atomic
from ldm.lesion import AGREE, ATTRIBUTES, DISAGREE, NOT_APPLICABLE
from ldm.previews import save_figure
from quality.measure import LesionQuality

CSV_NAME = "fidelity.csv"
PLOT_NAME = "fidelity.png"
COLUMNS = ("attribute", "lesions_judged", "agreement_rate", "agree", "disagree", "not_applicable")
MAX_LABEL = 28
NUMERIC = ("size", "CT value")


@dataclass(frozen=True)
class AttributeFidelity:
    """Counts of one attribute over a run."""

    attribute: str
    agree: int
    disagree: int
    not_applicable: int

    @property
    def judged(self) -> int:
        return self.agree + self.disagree

    @property
    def rate(self) -> float | None:
        """Agreement rate among judged lesions, None when none was judged."""
        return round(self.agree / self.judged, 4) if self.judged else None


def fidelity(lesions: Sequence[LesionQuality]) -> list[AttributeFidelity]:
    """One :class:`AttributeFidelity` per attribute, in :data:`ldm.lesion.ATTRIBUTES` order."""
    rows = []
    for attribute in ATTRIBUTES:
        counts = Counter(v.verdict for lesion in lesions if (v := lesion.verdict(attribute)) is not None)
        rows.append(AttributeFidelity(attribute, counts[AGREE], counts[DISAGREE], counts[NOT_APPLICABLE]))
    return rows


def weakest(rows: Sequence[AttributeFidelity], count: int = 3) -> list[AttributeFidelity]:
    """The judged attributes with the lowest agreement rate (ties: more disagreements first), at most ``count``."""
    judged = [row for row in rows if row.judged]
    return sorted(judged, key=lambda row: (row.rate, -row.disagree))[:count]


def fidelity_csv(rows: Sequence[AttributeFidelity]) -> str:
    """The CSV text (module docstring)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([row.attribute, row.judged, "" if row.rate is None else row.rate, row.agree, row.disagree,
                         row.not_applicable])
    return buffer.getvalue()


def confusion(lesions: Sequence[LesionQuality], attribute: str) -> tuple[list[str], list[str], np.ndarray]:
    """``(requested phrases, measured phrases, counts[requested, measured])`` over the judged lesions."""
    pairs = [(v.requested.rstrip(","), v.measured.rstrip(",")) for lesion in lesions
             if (v := lesion.verdict(attribute)) is not None and v.verdict != NOT_APPLICABLE]
    requested = sorted({r for r, _ in pairs})
    measured = sorted({m for _, m in pairs})
    counts = np.zeros((len(requested), len(measured)), dtype=np.int64)
    for r, m in pairs:
        counts[requested.index(r), measured.index(m)] += 1
    return requested, measured, counts


def _short(text: str) -> str:
    return text if len(text) <= MAX_LABEL else text[:MAX_LABEL - 1] + "…"


def plot_fidelity(lesions: Sequence[LesionQuality], path: Path, dpi: int = 80) -> Path:
    """Write the confusion matrices (module docstring) to ``path``; returns it."""
    attributes = [name for name in ATTRIBUTES if name not in NUMERIC and confusion(lesions, name)[2].size]
    columns = 3
    rows = max(1, -(-len(attributes) // columns))
    figure = Figure(figsize=(4.2 * columns, 3.2 * rows))
    FigureCanvasAgg(figure)
    grid = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for axes in grid[len(attributes):]:
        axes.set_axis_off()
    if not attributes:
        grid[0].text(0.5, 0.5, "no attribute was judged", ha="center", va="center", transform=grid[0].transAxes)
    for axes, name in zip(grid, attributes):
        requested, measured, counts = confusion(lesions, name)
        axes.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max()), 1))
        for (i, j), value in np.ndenumerate(counts):
            axes.text(j, i, str(value), ha="center", va="center", fontsize=8,
                      color="white" if value > counts.max() / 2 else "black")
        axes.set_xticks(range(len(measured)), [_short(m) for m in measured], rotation=30, ha="right", fontsize=7)
        axes.set_yticks(range(len(requested)), [_short(r) for r in requested], fontsize=7)
        axes.set_title(name, fontsize=9)
        axes.set_xlabel("measured", fontsize=8)
        axes.set_ylabel("requested", fontsize=8)
    figure.suptitle("Requested x measured phrase per attribute (lesion counts)", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, Path(path), dpi)


def write_fidelity(exp_dir: Path, lesions: Sequence[LesionQuality], plot: bool = True) -> dict[str, Path]:
    """Write ``fidelity.csv`` (and ``fidelity.png`` with ``plot``) into ``exp_dir``; returns ``{kind: path}``."""
    written = {"fidelity": write_text_atomic(Path(exp_dir) / CSV_NAME, fidelity_csv(fidelity(lesions)))}
    if plot:
        written["fidelity_plot"] = plot_fidelity(lesions, Path(exp_dir) / PLOT_NAME)
    return written
