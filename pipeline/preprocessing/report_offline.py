"""The offline reporter: a structured report sampled from the vocabulary, seeded, with no network.

Choices follow the lesion type (matched by keywords: cyst, stone, tumour as the default) and the organ:
a cyst is hypodense or fluid-like, homogeneous, well-defined, round-like, 0-20 HU; a stone is hyperdense,
punctate or nodular, "stone"/"calculus", 300-900 HU, in the lumen of a hollow organ; a tumour is hypo-, iso- or
mixed-density, mostly heterogeneous, irregular or round-like, a little darker than the organ (its measured mean
HU); in a hollow organ it thickens the wall or protrudes into the lumen; in a lung lobe it is a soft-tissue
nodule or a ground-glass opacity. The enhancement status follows the CT when it is known. The lesion size is
drawn in mm for the lesion kind, converted to voxels, and shrunk until the boxes fit in the organ.
User attributes always win.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ldm.data.organs import is_lung
from preprocessing.report_format import CT_VALUE, SIZE, ReportError, ReportRequest, build_report, check_fixed_size
from ldm.data.attributes import HOLLOW_CAVITIES, SOLID_CAVITIES
from ldm.data.vocabulary import CAVITY, group_index, vocabulary

KIND_WORDS = {
    "cyst": ("cyst", "cystic", "pseudocyst"),
    "stone": ("stone", "calculus", "calculi", "calcification", "lithiasis"),
}
# Diameter range in mm per lesion kind.
DIAMETER_MM = {"cyst": (8.0, 40.0), "stone": (3.0, 12.0), "tumour": (10.0, 50.0)}
# Mean lesion HU: relative to the organ's soft tissue for these density groups (hypo, iso, hyper, mixed) ...
DENSITY_OFFSET_HU = {0: (-50.0, -20.0), 1: (-8.0, 8.0), 2: (20.0, 60.0), 3: (-25.0, -5.0)}
# ... absolute for the others (fluid-like, soft-tissue nodule, nodule with ground glass, ground glass) and by kind.
GROUP_HU = {4: (0.0, 20.0), 5: (20.0, 50.0), 6: (-300.0, 0.0), 7: (-700.0, -300.0)}
KIND_HU = {"cyst": (0.0, 20.0), "stone": (300.0, 900.0)}
# The organ reference is clamped to soft tissue: a hollow organ's mean includes gas, a lung's is air.
SOFT_TISSUE_HU = (20.0, 200.0)
DEFAULT_ORGAN_HU = 50.0
ENHANCED, NON_CONTRAST = 0, 1
SHRINK = 0.8


def lesion_kind(lesion_type: str) -> str:
    """``"cyst"``, ``"stone"`` or ``"tumour"`` (the default: tumor, cancer, mass, metastasis, ...)."""
    text = lesion_type.lower()
    for kind, words in KIND_WORDS.items():
        if any(word in text for word in words):
            return kind
    return "tumour"


def _pick(rng: np.random.Generator, options: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    probabilities = None if weights is None else np.asarray(weights, dtype=float) / np.sum(weights)
    return options[int(rng.choice(len(options), p=probabilities))]


def _phrase(rng: np.random.Generator, attribute: str, *groups: int, weights: Sequence[float] | None = None) -> str:
    """A random synonym of one of the given synonym groups, as a report value (``"phrase,"``)."""
    group = vocabulary()[attribute][_pick(rng, groups, weights)]
    return f"{_pick(rng, group)},"


def _tumour_choices(request: ReportRequest, rng: np.random.Generator) -> dict[str, str]:
    organ = request.organ_name
    if is_lung(request.organ_id):
        return {
            "shape": _phrase(rng, "shape", 0, 1, 3, weights=[0.4, 0.3, 0.3]),
            "density": _phrase(rng, "density", 5, 6, 7, weights=[0.6, 0.2, 0.2]),
            "density variations": _phrase(rng, "density variations", 0, 1, weights=[0.5, 0.5]),
            "surface characteristics": _phrase(rng, "surface characteristics", 0, 3, weights=[0.4, 0.6]),
            "specific features": _pick(rng, ["", "spiculated margins,"], [0.5, 0.5]),
            CAVITY: _pick(rng, [f"{c}," for c in SOLID_CAVITIES], [0.7, 0.3]),
        }
    if request.hollow:
        protruding = rng.random() < 0.4
        surface = "poorly defined boundary with normal esophageal tissue," if organ == "esophagus" else \
            _phrase(rng, "surface characteristics", 1, 4)
        return {
            "shape": "round-like,protrusion into the lumen," if protruding else
            _phrase(rng, "shape", 2, 5, weights=[0.8, 0.2]),
            "density": _phrase(rng, "density", 0, 1, 3, weights=[0.3, 0.5, 0.2]),
            "density variations": _phrase(rng, "density variations", 0, 1, weights=[0.3, 0.7]),
            "surface characteristics": surface,
            "specific features": "",
            CAVITY: f"{HOLLOW_CAVITIES[0] if protruding else HOLLOW_CAVITIES[1]},",
        }
    kidney = organ.startswith("kidney")
    return {
        "shape": _phrase(rng, "shape", 1, 0, weights=[0.6, 0.4]),
        "density": _phrase(rng, "density", 0, 1, 3, weights=[0.5, 0.2, 0.3]),
        "density variations": _phrase(rng, "density variations", 0, 1, weights=[0.2, 0.8]),
        "surface characteristics": _phrase(rng, "surface characteristics", 5 if kidney else 3, 0, weights=[0.7, 0.3]),
        "specific features": _pick(rng, ["", "presence of decreased density areas,",
                                         "presence of increased density areas,presence of decreased density areas,"],
                                   [0.5, 0.35, 0.15]),
        CAVITY: _pick(rng, [f"{c}," for c in SOLID_CAVITIES], [0.7, 0.3]),
    }


def _categorical_choices(request: ReportRequest, kind: str, rng: np.random.Generator) -> dict[str, str]:
    if kind == "tumour":
        return _tumour_choices(request, rng)
    cavity = f"{HOLLOW_CAVITIES[0] if request.hollow else SOLID_CAVITIES[0]},"
    if kind == "stone":
        return {
            "shape": _phrase(rng, "shape", 3),
            "density": _phrase(rng, "density", 2),
            "density variations": "homogeneous,",
            "surface characteristics": "well-defined margin,",
            "specific features": _phrase(rng, "specific features", 5),
            CAVITY: cavity,
        }
    kidney = request.organ_name.startswith("kidney")
    pancreas = request.organ_name == "pancreas"
    return {
        "shape": _pick(rng, ["round-like,", "cystic,"], [0.7, 0.3]),
        "density": _phrase(rng, "density", 0, 4, weights=[0.5, 0.5]),
        "density variations": "homogeneous,",
        "surface characteristics": "clear boundary with the renal parenchyma," if kidney else "well-defined margin,",
        "specific features": _pick(rng, ["", "retention of pancreatic fluid,"], [0.5, 0.5]) if pancreas else "",
        CAVITY: cavity,
    }


def _ct_value(kind: str | None, density: str, organ_hu: float, rng: np.random.Generator) -> int:
    group = group_index("density", density.split(",")[0])
    if kind in KIND_HU:
        low, high = KIND_HU[kind]
    elif group in GROUP_HU:
        low, high = GROUP_HU[group]
    else:
        reference = float(np.clip(organ_hu, *SOFT_TISSUE_HU))
        low, high = (reference + offset for offset in DENSITY_OFFSET_HU.get(group, DENSITY_OFFSET_HU[1]))
    return int(round(rng.uniform(low, high)))


def _size(request: ReportRequest, kind: str, cavity: str, rng: np.random.Generator) -> tuple[int, int, int]:
    diameter = rng.uniform(*DIAMETER_MM[kind])
    stretch = rng.uniform(0.75, 1.25, size=3)
    size = np.maximum(np.rint(diameter * stretch / np.asarray(request.spacing_xyz_mm)), 1)
    size = np.minimum(size, request.organ_extent_xyz)
    if request.max_size_xyz is not None:
        size = np.minimum(size, request.max_size_xyz)
    while True:
        problem = request.size_problem(tuple(int(s) for s in size), cavity)
        if problem is None:
            return tuple(int(s) for s in size)
        if size.max() == 1:
            raise ReportError(problem)
        size = np.maximum(np.floor(size * SHRINK), 1)


class OfflineReporter:
    """Samples a report from the vocabulary; same request and generator state -> same report."""

    name = "offline"
    settings = {"reporter": "offline"}

    def generate(self, request: ReportRequest, rng: np.random.Generator) -> dict[str, list]:
        """The ``type.json`` dict for ``request`` (see the module docstring for the choices)."""
        kind = lesion_kind(request.lesion_type)
        values: dict[str, Any] = _categorical_choices(request, kind, rng)
        if request.contrast_enhanced is None:
            values["enhancement status"] = _phrase(rng, "enhancement status", ENHANCED, NON_CONTRAST)
        else:
            values["enhancement status"] = _phrase(rng, "enhancement status",
                                                   ENHANCED if request.contrast_enhanced else NON_CONTRAST)
        values["relationship with adjacent organs"] = _phrase(
            rng, "relationship with adjacent organs", 0, 1, weights=[0.9, 0.1] if kind != "tumour" else [0.6, 0.4])
        values.update({key: value for key, value in request.fixed.items() if key not in (CT_VALUE, SIZE)})
        organ_hu = DEFAULT_ORGAN_HU if request.organ_mean_hu is None else request.organ_mean_hu
        # A density the user fixed decides the HU range, not the lesion kind.
        hu_kind = None if "density" in request.fixed else kind
        values[CT_VALUE] = request.fixed.get(CT_VALUE, _ct_value(hu_kind, values["density"], organ_hu, rng))
        if SIZE in request.fixed:
            check_fixed_size(request)
            size = request.fixed[SIZE]
        else:
            size = _size(request, kind, values[CAVITY], rng)
        return build_report(request.organ_id, values, request.organ_extent_xyz, size)
