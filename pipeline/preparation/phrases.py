"""Measurements -> report phrases of ``description.json`` (plus ``cavity``), with the thresholds that decide them.

Each attribute is decided from the measurements of :mod:`preparation.measure` as follows:

================================  =========================================================================
enhancement status                aorta mean HU > 150: ``enhanced ct``, else ``non-contrast ct``
                                  (*undecided* without an aorta in the segmentation: ``non-contrast ct``)
density                           contrast with the organ within +-``ISO_BAND_HU`` (10): ``isodense lesion``;
                                  below: ``hypodense lesion`` (``hypodense fluid-like lesion`` when also
                                  homogeneous and the mean lies in ``FLUID_HU`` -10..20); above:
                                  ``hyperdense lesion``; ``mixed-density lesion`` when at least
                                  ``MIXED_FRACTION`` (25 %) of the interior lies below the iso band and as
                                  much above it. Lung lobes: ``isodense soft tissue mass`` when the mean is
                                  above -100 HU, else ``low-density ground-glass opacity``
density variations                ``heterogeneous`` when the interior spread exceeds the organ's noise by
                                  ``HETEROGENEOUS_RATIO`` (1.5x) and ``HETEROGENEOUS_MIN_HU`` (5 HU)
specific features                 heterogeneous lesions: ``presence of decreased / increased density areas``
                                  for each tail (beyond 2 noise SD from the lesion's mean) holding
                                  ``TAIL_FRACTION`` (8 %) of the interior; else empty (*undecided*: the image
                                  alone cannot tell spiculation or fluid retention)
shape                             hollow organ: ``protrusion into the lumen`` (lesion in the lumen) or
                                  ``irregular wall thickening``; equivalent diameter below
                                  ``NODULAR_MM`` (6 mm): ``nodular``; solidity >= ``ROUND_SOLIDITY`` (0.85) and
                                  elongation <= ``ROUND_ELONGATION`` (2): ``round-like``, else ``irregular``
surface characteristics           margin leak < ``SHARP_LEAK`` (0.4): well-defined, else ill-defined, in the
                                  organ's words (kidney: boundary with the renal parenchyma; hollow organs:
                                  serosal surface; oesophagus); *undecided* for an isodense lesion (no margin
                                  to see): ill-defined
relationship with adjacent organs another segmented structure within ``ADJACENT_MM`` (5 mm): close
cavity                            solid organ: ``within the parenchymal organ`` when >= 90 % of the lesion's
                                  outer shell is organ or lesion (the loader's rule), else protruding; hollow
                                  organ: ``within the lumen`` when >= half the lesion is in the lumen, else
                                  ``wall thickening``
================================  =========================================================================

``CT value`` is the interior mean HU and ``size`` the bounding box; ``lesion location`` is the organ id. An *undecided*
attribute gets the fallback above and is listed, so ``--reporter llm`` may refine it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ldm.data.attributes import HOLLOW_CAVITIES, SOLID_CAVITIES, WITHIN_ORGAN_FRACTION
from ldm.data.organs import is_hollow, is_lung, organ_name
from preprocessing.case import ENHANCED_AORTA_HU
from preparation.measure import LesionMeasurement

ISO_BAND_HU = 10.0
FLUID_HU = (-10.0, 20.0)
MIXED_FRACTION = 0.25
HETEROGENEOUS_RATIO = 1.5
HETEROGENEOUS_MIN_HU = 5.0
TAIL_FRACTION = 0.08
NODULAR_MM = 6.0
ROUND_SOLIDITY = 0.85
ROUND_ELONGATION = 2.0
SHARP_LEAK = 0.4
ADJACENT_MM = 5.0
LUMEN_FRACTION = 0.5
LUNG_SOFT_TISSUE_HU = -100.0
# (well-defined, ill-defined) surface phrases per organ kind.
SURFACE = {"kidney": ("clear boundary with the renal parenchyma", "unclear boundary with the renal parenchyma"),
           "hollow": ("clear serosal surface", "serosal surface irregularity"),
           "esophagus": ("well-defined margin", "poorly defined boundary with normal esophageal tissue"),
           "other": ("well-defined margin", "ill-defined margin")}


@dataclass
class Phrases:
    """Report values (phrases each followed by a comma) and the attributes the image could not decide."""

    values: dict[str, str]
    undecided: list[str] = field(default_factory=list)


def _value(*phrases: str) -> str:
    return "".join(f"{phrase}," for phrase in phrases)


def heterogeneous(m: LesionMeasurement) -> bool:
    """True when the lesion's interior varies clearly more than the organ's noise."""
    return m.interior_std_hu > max(HETEROGENEOUS_RATIO * m.organ_noise_hu, m.organ_noise_hu + HETEROGENEOUS_MIN_HU)


def density(m: LesionMeasurement, organ_id: int) -> str:
    """The ``density`` phrase (module docstring)."""
    if is_lung(organ_id):
        return "isodense soft tissue mass" if m.interior_mean_hu > LUNG_SOFT_TISSUE_HU else "low-density ground-glass opacity"
    if m.below_fraction >= MIXED_FRACTION and m.above_fraction >= MIXED_FRACTION:
        return "mixed-density lesion"
    if m.contrast_hu < -ISO_BAND_HU:
        fluid = FLUID_HU[0] <= m.interior_mean_hu <= FLUID_HU[1] and not heterogeneous(m)
        return "hypodense fluid-like lesion" if fluid else "hypodense lesion"
    return "hyperdense lesion" if m.contrast_hu > ISO_BAND_HU else "isodense lesion"


def _surface_kind(organ_id: int) -> str:
    name = organ_name(organ_id)
    if name == "esophagus":
        return "esophagus"
    if name.startswith("kidney"):
        return "kidney"
    return "hollow" if is_hollow(organ_id) else "other"


def measured_phrases(m: LesionMeasurement, organ_id: int) -> Phrases:
    """The vocabulary values for a measured lesion in organ ``organ_id`` (module docstring)."""
    hollow = is_hollow(organ_id)
    undecided: list[str] = []
    if m.aorta_hu is None:
        undecided.append("enhancement status")
    enhanced = m.aorta_hu is not None and m.aorta_hu > ENHANCED_AORTA_HU
    varied = heterogeneous(m)
    features = []
    if varied and m.low_tail >= TAIL_FRACTION:
        features.append("presence of decreased density areas")
    if varied and m.high_tail >= TAIL_FRACTION:
        features.append("presence of increased density areas")
    if not features:
        undecided.append("specific features")
    if hollow:
        in_lumen = m.lumen_fraction >= LUMEN_FRACTION
        cavity = HOLLOW_CAVITIES[0] if in_lumen else HOLLOW_CAVITIES[1]
        shape = "protrusion into the lumen" if in_lumen else "irregular wall thickening"
    else:
        cavity = SOLID_CAVITIES[0] if m.shell_in_organ >= WITHIN_ORGAN_FRACTION else SOLID_CAVITIES[1]
        round_like = (m.solidity is not None and m.solidity >= ROUND_SOLIDITY and m.elongation <= ROUND_ELONGATION)
        shape = "nodular" if m.equivalent_diameter_mm < NODULAR_MM else ("round-like" if round_like else "irregular")
    sharp, blurred = SURFACE[_surface_kind(organ_id)]
    if m.margin_leak is None:
        undecided.append("surface characteristics")
    close = m.nearest_other_organ_mm is not None and m.nearest_other_organ_mm <= ADJACENT_MM
    values = {
        "enhancement status": _value("enhanced ct" if enhanced else "non-contrast ct"),
        "shape": _value(shape),
        "density": _value(density(m, organ_id)),
        "density variations": _value("heterogeneous" if varied else "homogeneous"),
        "surface characteristics": _value(sharp if m.margin_leak is not None and m.margin_leak < SHARP_LEAK
                                          else blurred),
        "relationship with adjacent organs": _value("close relationship with adjacent organs" if close else
                                                    "no close relationship with surrounding organs"),
        "specific features": _value(*features),
        "cavity": _value(cavity),
    }
    return Phrases(values, undecided)
