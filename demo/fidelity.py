"""How well a synthesised lesion matches its report: the phrases the scan supports vs the requested ones.

:func:`describe_lesion` is the one place the demo and ``bench/text_control.py`` measure a lesion: today it calls
:func:`ldm.lesion.describe_lesion`, the one lesion description that writes training reports and that the quality
gate checks with.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

_PIPELINE = str(Path(__file__).resolve().parents[1] / "pipeline")
if _PIPELINE not in sys.path:
    sys.path.insert(0, _PIPELINE)

from ldm.data.attributes import short_ct_value  # noqa: E402
from ldm.util import PIPELINE_DIR  # noqa: E402
from ldm.lesion import LesionMeasurement  # noqa: E402
from ldm.lesion import describe_lesion as describe  # noqa: E402

JUDGED = ("density", "shape", "surface characteristics", "density variations")
HU_TOLERANCE = 20.0  # |interior mean - requested CT value| that counts as "the requested CT value"
DESCRIPTION = json.loads((PIPELINE_DIR / "description.json").read_text())
# description.json group index -> the class a phrase stands for (synonyms, fluid-like and cystic folded in).
CLASSES = {"density": {0: "hypo", 4: "hypo", 1: "iso", 2: "hyper", 3: "mixed"},
           "shape": {0: "round", 4: "round", 1: "irregular", 3: "nodular"},
           "surface characteristics": {0: "sharp", 1: "sharp", 2: "sharp", 3: "fading", 4: "fading", 5: "fading",
                                       6: "fading"},
           "density variations": {0: "homogeneous", 1: "heterogeneous"}}


def describe_lesion(ct: np.ndarray, lesion: np.ndarray, seg: np.ndarray, organ: int,
                    spacing: Sequence[float]) -> tuple[dict[str, str], LesionMeasurement]:
    """The report phrases the scan supports for ``lesion`` (bool, on the grid of ``ct`` in HU and of the v1
    segmentation ``seg``; ``spacing`` in mm along the array axes) and the measurements behind them."""
    description = describe(ct, lesion, seg, spacing, organ_id=organ)
    return description.phrases.values, description.measurement


def phrase_class(attribute: str, phrase: str) -> str:
    """hypo / iso / hyper / mixed, round / irregular / nodular, sharp / fading or homogeneous / heterogeneous for a
    report phrase of one of :data:`JUDGED` (the phrase itself when it is none of those)."""
    first = phrase.split(",")[0].strip().lower()
    for index, synonyms in enumerate(DESCRIPTION[attribute]):
        if first in (synonym.split(",")[0].strip().lower() for synonym in synonyms):
            return CLASSES[attribute].get(index, first)
    return first


def judge(requested: Mapping[str, str], phrases: Mapping[str, str],
          measurement: LesionMeasurement) -> dict[str, tuple[str, str | None]]:
    """Per attribute of :data:`JUDGED` plus ``CT value``: ``(requested, measured)``; measured is None where the
    scan cannot tell (an isodense lesion has no margin to see)."""
    pairs: dict[str, tuple[str, str | None]] = {}
    for name in JUDGED:
        measured = phrase_class(name, phrases[name])
        if name == "surface characteristics" and measurement.margin_leak is None:
            measured = None
        pairs[name] = (phrase_class(name, requested[name]), measured)
    wanted = float(short_ct_value(requested["CT value"]).split()[0])
    pairs["CT value"] = (f"{wanted:.0f} HU", f"{measurement.interior_mean_hu:.0f} HU")
    return pairs


def agrees(name: str, pair: tuple[str, str | None]) -> bool | None:
    """Whether a requested/measured pair of :func:`judge` agrees (None: cannot be judged)."""
    requested, measured = pair
    if measured is None:
        return None
    if name == "CT value":
        return abs(float(requested.split()[0]) - float(measured.split()[0])) <= HU_TOLERANCE
    return requested == measured


def fidelity_line(pairs: Mapping[str, tuple[str, str | None]], components: int) -> str:
    """One line: every judged attribute as ``requested -> measured`` with ok / DIFFERS / n/a, and the components."""
    cells = []
    for name, pair in pairs.items():
        verdict = {True: "ok", False: "DIFFERS", None: "n/a"}[agrees(name, pair)]
        cells.append(f"{name} {pair[0]} -> {pair[1] or '?'} {verdict}")
    return "; ".join(cells) + f"; components {components} {'ok' if components == 1 else 'DIFFERS'}"
