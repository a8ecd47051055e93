"""Density classes: what the report's ``density`` asks for, and what a measured contrast is.

Report side: each synonym group of ``description.json``'s ``density`` is one class, keyed below by the group's
first phrase. Mixed density and ring enhancement describe a pattern, not a mean contrast, and are not checked
(class ``None``); so is a value that is not a vocabulary phrase. When a value lists several phrases, the first
decides.

Measured side: the lesion's mean HU minus the surrounding organ's reference HU (see :mod:`quality.measure`):
``iso`` within ``± iso_band_hu``, ``hypo`` below, ``hyper`` above. The default band (10 HU) matches the phantom
generator's and sits between the offline reporter's iso range (± 8 HU) and its hypo/hyper ranges (20 HU or more).
"""
from __future__ import annotations

from preprocessing.vocabulary import VocabularyError, clean_phrase, group_index, vocabulary

HYPO, ISO, HYPER = "hypo", "iso", "hyper"
CLASSES = (HYPO, ISO, HYPER)
GROUP_CLASSES = {
    "hypodense lesion": HYPO,
    "isodense lesion": ISO,
    "hyperdense lesion": HYPER,
    "mixed-density lesion": None,
    "hypoattenuating fluid-like lesion": HYPO,
    "isodense soft tissue mass": ISO,
    "isodense soft tissue mass with peripheral low-density ground-glass opacity": ISO,
    "low-density ground-glass opacity": HYPO,
    "ring enhancement": None,
}


def requested_density(value: str | None) -> str | None:
    """``hypo``/``iso``/``hyper`` for a report ``density`` value, None when absent or not checkable."""
    if not isinstance(value, str) or not value.strip(", "):
        return None
    first = clean_phrase(value.split(",")[0])
    try:
        group = group_index("density", first)
    except VocabularyError:
        return None
    return GROUP_CLASSES.get(vocabulary()["density"][group][0])


def measured_density(contrast_hu: float | None, iso_band_hu: float) -> str | None:
    """Class of a lesion whose mean is ``contrast_hu`` HU above its surroundings (None when unmeasured)."""
    if contrast_hu is None:
        return None
    if contrast_hu < -iso_band_hu:
        return HYPO
    return HYPER if contrast_hu > iso_band_hu else ISO
