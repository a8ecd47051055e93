"""Measurements -> report phrases of ``description.json`` (plus ``cavity``); thresholds: :mod:`ldm.lesion.thresholds`.

Each attribute is decided from a :class:`ldm.lesion.measure.LesionMeasurement` as follows (default thresholds):

================================  =========================================================================
enhancement status                aorta mean HU > ``enhanced_aorta_hu`` (150): ``enhanced ct``, else
                                  ``non-contrast ct`` (*undecided* without an aorta: ``non-contrast ct``)
density                           contrast with the organ within +-``iso_band_hu`` (10): ``isodense lesion``;
                                  below: ``hypodense lesion`` (``hypodense fluid-like lesion`` when also
                                  homogeneous and the mean lies in ``fluid_hu`` -10..20); above:
                                  ``hyperdense lesion``; ``mixed-density lesion`` when at least
                                  ``mixed_fraction`` (25 %) of the interior lies below the iso band and as
                                  much above it. Lung lobes: ``isodense soft tissue mass`` when the mean is
                                  above ``lung_soft_tissue_hu`` (-100), else ``low-density ground-glass opacity``
density variations                ``heterogeneous`` when the interior spread exceeds the organ's noise by
                                  ``heterogeneous_ratio`` (1.5x) and ``heterogeneous_min_hu`` (5 HU)
specific features                 heterogeneous lesions: ``presence of decreased / increased density areas``
                                  for each tail holding ``tail_fraction`` (8 %) of the interior; else empty
                                  (*undecided*: the image alone cannot tell spiculation or fluid retention)
shape                             hollow organ: ``protrusion into the lumen`` (lesion in the lumen) or
                                  ``irregular wall thickening``; equivalent diameter below ``nodular_mm``
                                  (6 mm): ``nodular``; solidity >= ``round_solidity`` (0.85) and elongation
                                  <= ``round_elongation`` (2): ``round-like``, else ``irregular``
surface characteristics           margin leak < ``sharp_leak`` (0.4): well-defined, else ill-defined, in the
                                  organ's words (kidney: boundary with the renal parenchyma; hollow organs:
                                  serosal surface; oesophagus); *undecided* for an isodense lesion (no margin
                                  to see): ill-defined
relationship with adjacent organs another segmented structure within ``adjacent_mm`` (5 mm): close
cavity                            solid organ: ``within the parenchymal organ`` when >= 90 % of the lesion's
                                  outer shell is organ or lesion (the loader's rule), else protruding; hollow
                                  organ: ``within the lumen`` when >= ``lumen_fraction`` of the lesion is in
                                  the lumen, else ``wall thickening``
================================  =========================================================================

``CT value`` is the interior mean HU and ``size`` the bounding box; ``lesion location`` is the organ id. An
*undecided* attribute gets the fallback above and is listed, so ``prepare_dataset.py --reporter llm`` may
refine it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ldm.data.attributes import HOLLOW_CAVITIES, SOLID_CAVITIES, WITHIN_ORGAN_FRACTION
from ldm.data.organs import is_hollow, is_lung, organ_name
from ldm.lesion.measure import LesionMeasurement
from ldm.lesion.thresholds import DEFAULT, Thresholds

# (well-defined, ill-defined) surface phrases per organ kind.
SURFACE = {"kidney": ("clear boundary with the renal parenchyma", "unclear boundary with the renal parenchyma"),
           "hollow": ("clear serosal surface", "serosal surface irregularity"),
           "esophagus": ("well-defined margin", "poorly defined boundary with normal esophageal tissue"),
           "other": ("well-defined margin", "ill-defined margin")}
DECREASED_AREAS, INCREASED_AREAS = "presence of decreased density areas", "presence of increased density areas"


@dataclass
class Phrases:
    """Report values (phrases each followed by a comma) and the attributes the image could not decide."""

    values: dict[str, str]
    undecided: list[str] = field(default_factory=list)


def _value(*phrases: str) -> str:
    return "".join(f"{phrase}," for phrase in phrases)


def heterogeneous(m: LesionMeasurement, thresholds: Thresholds = DEFAULT) -> bool:
    """True when the lesion's interior varies clearly more than the organ's noise."""
    return m.interior_std_hu > max(thresholds.heterogeneous_ratio * m.organ_noise_hu,
                                   m.organ_noise_hu + thresholds.heterogeneous_min_hu)


def density(m: LesionMeasurement, organ_id: int, thresholds: Thresholds = DEFAULT) -> str:
    """The ``density`` phrase (module docstring)."""
    if is_lung(organ_id):
        soft = m.interior_mean_hu > thresholds.lung_soft_tissue_hu
        return "isodense soft tissue mass" if soft else "low-density ground-glass opacity"
    if m.below_fraction >= thresholds.mixed_fraction and m.above_fraction >= thresholds.mixed_fraction:
        return "mixed-density lesion"
    if m.contrast_hu < -thresholds.iso_band_hu:
        low, high = thresholds.fluid_hu
        fluid = low <= m.interior_mean_hu <= high and not heterogeneous(m, thresholds)
        return "hypodense fluid-like lesion" if fluid else "hypodense lesion"
    return "hyperdense lesion" if m.contrast_hu > thresholds.iso_band_hu else "isodense lesion"


def surface_kind(organ_id: int) -> str:
    """``kidney``, ``hollow``, ``esophagus`` or ``other``: which words the organ's margin is described in."""
    name = organ_name(organ_id)
    if name == "esophagus":
        return "esophagus"
    if name.startswith("kidney"):
        return "kidney"
    return "hollow" if is_hollow(organ_id) else "other"


def measured_phrases(m: LesionMeasurement, organ_id: int, thresholds: Thresholds = DEFAULT) -> Phrases:
    """The vocabulary values for a measured lesion in organ ``organ_id`` (module docstring)."""
    hollow = is_hollow(organ_id)
    undecided: list[str] = []
    if m.aorta_hu is None:
        undecided.append("enhancement status")
    enhanced = m.aorta_hu is not None and m.aorta_hu > thresholds.enhanced_aorta_hu
    varied = heterogeneous(m, thresholds)
    features = []
    if varied and m.low_tail >= thresholds.tail_fraction:
        features.append(DECREASED_AREAS)
    if varied and m.high_tail >= thresholds.tail_fraction:
        features.append(INCREASED_AREAS)
    if not features:
        undecided.append("specific features")
    if hollow:
        in_lumen = m.lumen_fraction >= thresholds.lumen_fraction
        cavity = HOLLOW_CAVITIES[0] if in_lumen else HOLLOW_CAVITIES[1]
        shape = "protrusion into the lumen" if in_lumen else "irregular wall thickening"
    else:
        cavity = SOLID_CAVITIES[0] if m.shell_in_organ >= WITHIN_ORGAN_FRACTION else SOLID_CAVITIES[1]
        round_like = (m.solidity is not None and m.solidity >= thresholds.round_solidity
                      and m.elongation <= thresholds.round_elongation)
        shape = ("nodular" if m.equivalent_diameter_mm < thresholds.nodular_mm
                 else "round-like" if round_like else "irregular")
    sharp, blurred = SURFACE[surface_kind(organ_id)]
    if m.margin_leak is None:
        undecided.append("surface characteristics")
    close = m.nearest_other_organ_mm is not None and m.nearest_other_organ_mm <= thresholds.adjacent_mm
    values = {
        "enhancement status": _value("enhanced ct" if enhanced else "non-contrast ct"),
        "shape": _value(shape),
        "density": _value(density(m, organ_id, thresholds)),
        "density variations": _value("heterogeneous" if varied else "homogeneous"),
        "surface characteristics": _value(sharp if m.margin_leak is not None and m.margin_leak < thresholds.sharp_leak
                                          else blurred),
        "relationship with adjacent organs": _value("close relationship with adjacent organs" if close else
                                                    "no close relationship with surrounding organs"),
        "specific features": _value(*features),
        "cavity": _value(cavity),
    }
    return Phrases(values, undecided)
