"""Does a lesion look like what was asked for? One verdict per report attribute: agree, disagree or n/a (with why).

A request (:class:`Request`) is what a report states about one lesion: its organ, its attribute dict (element
``[2]`` of a ``type.json`` entry), the size in voxels along the file's axes and the CT value in HU. The
description (:class:`ldm.lesion.LesionDescription`) is what the scan shows. Per attribute:

================================  ============================================================================
lesion location                   the organ holding most of the lesion is the requested one (lung lobes: any lobe)
size                              measured / requested box extent within ``extent_ratio`` along every file axis
CT value                          ``|interior mean - CT value| <= hu_abs``
enhancement status                always n/a: enhancement is a change between phases; one phase cannot show it
density                           same class: hypo (fluid-like included), iso, hyper, mixed; in a lung, soft
                                  tissue mass or ground glass; ring enhancement n/a (a pattern between phases);
                                  a lesion measured mixed is judged on its mean contrast unless mixed was asked
density variations                same phrase (homogeneous / heterogeneous)
specific features                 the requested decreased / increased density areas are measured; the other
                                  features (spiculation, fluid retention, stones) and an empty request are n/a
shape                             the measured phrase is one of the requested ones (nodular and round-like count
                                  as one: a small round lesion); cystic and luminal narrowing are n/a
surface characteristics           same kind (well-defined / ill-defined); n/a when the lesion is isodense (no
                                  margin to see) or has no organ around it
cavity                            same phrase
relationship with adjacent organs same phrase
================================  ============================================================================

An attribute the report does not state is n/a ("not requested").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ldm.data.attributes import CAVITY_PHRASES
from ldm.data.organs import is_lung, organ_name
from ldm.data.vocabulary import VocabularyError, group_index, split_phrases, vocabulary
from ldm.lesion.thresholds import DEFAULT, Thresholds

AGREE, DISAGREE, NOT_APPLICABLE = "agree", "disagree", "n/a"
ATTRIBUTES = ("lesion location", "size", "CT value", "enhancement status", "density", "density variations",
              "specific features", "shape", "surface characteristics", "cavity", "relationship with adjacent organs")
# Density classes keyed by the first phrase of each synonym group of description.json.
DENSITY_CLASSES = {
    "hypodense lesion": "hypo", "isodense lesion": "iso", "hyperdense lesion": "hyper",
    "mixed-density lesion": "mixed", "hypoattenuating fluid-like lesion": "hypo",
    "isodense soft tissue mass": "soft tissue",
    "isodense soft tissue mass with peripheral low-density ground-glass opacity": "soft tissue",
    "low-density ground-glass opacity": "ground glass", "ring enhancement": None,
}
# What a class means in the other kind of organ (a lung lesion is measured as soft tissue or ground glass).
IN_LUNG = {"hypo": "ground glass", "iso": "soft tissue", "hyper": "soft tissue", "mixed": None}
OUTSIDE_LUNG = {"soft tissue": "iso", "ground glass": "hypo"}
MEAN_PHRASES = {"hypo": "hypodense", "iso": "isodense", "hyper": "hyperdense"}
# Synonym groups of specific features the image shows: decreased areas, increased areas, both.
FEATURE_AREAS = {0: ("decreased",), 1: ("increased",), 2: ("decreased", "increased")}
ROUND_SHAPES = ("round-like", "punctate")  # first phrases of the groups counted as one
UNMEASURED_SHAPES = ("cystic", "luminal narrowing")
WELL_DEFINED_GROUPS = 3  # the first three groups of surface characteristics are well-defined margins


@dataclass(frozen=True)
class Request:
    """What a report asks of one lesion: organ (v1 id), attribute dict, size ``(X, Y, Z)`` voxels, CT value HU."""

    organ_id: int
    attributes: Mapping[str, Any] = field(default_factory=dict)
    size_vox: tuple[int, int, int] | None = None
    ct_value_hu: float | None = None


@dataclass(frozen=True)
class Verdict:
    """One attribute: the requested and measured phrases, ``agree``/``disagree``/``n/a``, and why when n/a."""

    attribute: str
    requested: str
    measured: str
    verdict: str
    reason: str = ""


def _groups(attribute: str, value: str) -> list[int]:
    """Synonym-group indices of the phrases of ``value`` (vocabulary order of appearance)."""
    try:
        return [group_index(attribute, phrase) for phrase in split_phrases(attribute, value)]
    except VocabularyError:
        return []


def _first(attribute: str, group: int) -> str:
    return vocabulary()[attribute][group][0]


def density_class(value: str, lung: bool) -> str | None:
    """The density class of a report value (its first phrase) in a lung or another organ; None when not checkable."""
    groups = _groups("density", value)
    if not groups:
        return None
    kind = DENSITY_CLASSES.get(_first("density", groups[0]))
    if kind is None:
        return None
    return IN_LUNG.get(kind, kind) if lung else OUTSIDE_LUNG.get(kind, kind)


def _verdict(attribute: str, requested: str, measured: str, agree: bool | None, reason: str = "") -> Verdict:
    if agree is None:
        return Verdict(attribute, requested, measured, NOT_APPLICABLE, reason)
    return Verdict(attribute, requested, measured, AGREE if agree else DISAGREE)


def _phrase_verdict(attribute: str, requested: str, measured: str) -> Verdict:
    wanted, seen = _groups(attribute, requested), _groups(attribute, measured)
    if not wanted:
        return _verdict(attribute, requested, measured, None, "the requested value is not a vocabulary phrase")
    return _verdict(attribute, requested, measured, bool(set(wanted) & set(seen)))


def _density(requested: str, measured: str, contrast_hu: float, lung: bool, thresholds: Thresholds) -> Verdict:
    """Same class; a lesion measured mixed is judged on its mean contrast unless mixed density was requested."""
    wanted, seen = density_class(requested, lung), density_class(measured, lung)
    if wanted is None:
        return _verdict("density", requested, measured, None, "ring enhancement is a pattern between phases")
    if seen == "mixed" and wanted != "mixed":
        band = thresholds.iso_band_hu
        seen = "hypo" if contrast_hu < -band else "hyper" if contrast_hu > band else "iso"
        measured = f"{measured} mean {MEAN_PHRASES[seen]},"
    return _verdict("density", requested, measured, wanted == seen)


def _shape(requested: str, measured: str) -> Verdict:
    wanted = [_first("shape", group) for group in _groups("shape", requested)]
    checkable = [phrase for phrase in wanted if phrase not in UNMEASURED_SHAPES]
    if not checkable:
        return _verdict("shape", requested, measured, None, "cystic or luminal narrowing is not measured")
    seen = [_first("shape", group) for group in _groups("shape", measured)]
    if any(phrase in ROUND_SHAPES for phrase in seen):
        seen += list(ROUND_SHAPES)
    return _verdict("shape", requested, measured, bool(set(checkable) & set(seen)))


def _surface(requested: str, measured: str, undecided: Sequence[str]) -> Verdict:
    wanted = _groups("surface characteristics", requested)
    if not wanted:
        return _verdict("surface characteristics", requested, measured, None, "not a vocabulary phrase")
    if "surface characteristics" in undecided:
        return _verdict("surface characteristics", requested, measured, None,
                        "the lesion is isodense or has no organ around it: no margin to see")
    seen = _groups("surface characteristics", measured)
    return _verdict("surface characteristics", requested, measured,
                    (wanted[0] < WELL_DEFINED_GROUPS) == (seen[0] < WELL_DEFINED_GROUPS))


def _features(requested: str, measured: str) -> Verdict:
    wanted = {area for group in _groups("specific features", requested) for area in FEATURE_AREAS.get(group, ())}
    if not wanted:
        return _verdict("specific features", requested, measured, None,
                        "only decreased / increased density areas are measured (not spiculation, fluid, stones)")
    seen = {area for group in _groups("specific features", measured) for area in FEATURE_AREAS.get(group, ())}
    return _verdict("specific features", requested, measured, wanted <= seen)


def _size(request: Request, size_vox: Sequence[int], thresholds: Thresholds) -> Verdict:
    measured = f"[[{' '.join(str(int(s)) for s in size_vox)}]] pixel,"
    if request.size_vox is None:
        return _verdict("size", "", measured, None, "not requested")
    low, high = thresholds.extent_ratio
    ratios = [m / r for m, r in zip(size_vox, request.size_vox)]
    requested = f"[[{' '.join(str(int(s)) for s in request.size_vox)}]] pixel,"
    return _verdict("size", requested, measured, all(low <= ratio <= high for ratio in ratios))


def compare(request: Request, description: Any, thresholds: Thresholds = DEFAULT) -> list[Verdict]:
    """One :class:`Verdict` per attribute of :data:`ATTRIBUTES` (module docstring) for ``description``
    (an :class:`ldm.lesion.LesionDescription`) against ``request``."""
    values, m = description.phrases.values, description.measurement
    lung = is_lung(int(request.organ_id))
    located = description.located_organ_id
    verdicts = []
    for attribute in ATTRIBUTES:
        requested = request.attributes.get(attribute)
        requested = requested if isinstance(requested, str) else ""
        measured = values.get(attribute, "")
        if attribute == "lesion location":
            measured = "" if located is None else f"{organ_name(located)},"
            wanted = f"{organ_name(request.organ_id)},"
            same = None if located is None else (located == request.organ_id or (lung and is_lung(located)))
            verdicts.append(_verdict(attribute, wanted, measured, same, "no segmentation under the lesion"))
        elif attribute == "size":
            verdicts.append(_size(request, m.size_vox, thresholds))
        elif attribute == "CT value":
            measured = f"{m.interior_mean_hu:.0f} HU,"
            agree = None if request.ct_value_hu is None else abs(m.interior_mean_hu - request.ct_value_hu) <= \
                thresholds.hu_abs
            verdicts.append(_verdict(attribute, "" if request.ct_value_hu is None else f"{request.ct_value_hu:.0f} HU,",
                                     measured, agree, "not requested"))
        elif not requested.strip(", "):
            verdicts.append(_verdict(attribute, requested, measured, None, "not requested"))
        elif attribute == "enhancement status":
            verdicts.append(_verdict(attribute, requested, measured, None,
                                     "enhancement is a change between phases: one phase cannot show it"))
        elif attribute == "density":
            verdicts.append(_density(requested, measured, m.contrast_hu, lung, thresholds))
        elif attribute == "shape":
            verdicts.append(_shape(requested, measured))
        elif attribute == "surface characteristics":
            verdicts.append(_surface(requested, measured, description.phrases.undecided))
        elif attribute == "specific features":
            verdicts.append(_features(requested, measured))
        elif attribute == "cavity":
            wanted = " ".join(requested.lower().split()).rstrip(",").strip() + ","
            verdicts.append(_verdict(attribute, requested, measured, wanted == measured if wanted in CAVITY_PHRASES
                                     else None, "not one of the four cavity phrases"))
        else:
            verdicts.append(_phrase_verdict(attribute, requested, measured))
    return verdicts
