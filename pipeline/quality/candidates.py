"""The judge of best of K and resampling (:mod:`inference.candidates`): the quality gate on one candidate.

A candidate is measured in memory exactly as :func:`quality.measure.measure_output` measures a written output (the
one lesion description, :mod:`ldm.lesion`, with the tolerances of ``EXP_DIR/quality.toml`` or the defaults) and
graded by :func:`quality.gate.grade`. Only what its stage decides counts:

======  ===============================================================  ==========================================
stage   report attributes (agree / disagree; n/a counts for neither)       numeric checks
======  ===============================================================  ==========================================
LMNet   lesion location, size, shape, cavity, relationship with            inside_organ, volume, extent, components
        adjacent organs (what a mask shows)
LINet   CT value, density, density variations, specific features,          hu, density
        surface characteristics, enhancement status (the inpainted HU)
======  ===============================================================  ==========================================

The agreement counts the attributes and the checks that no attribute already states (``extent`` is ``size``,
``hu`` is ``CT value``, ``density`` is ``density``: same measurement, same tolerance). A candidate **fails** on a
numeric check of its stage that fails or an attribute of its stage in ``fail_attributes`` that disagrees (unless
the ``attributes`` check is disabled): what would fail it at the gate. ``unchanged_outside`` is a property of a whole written output (the paste changes
nothing beyond its rim) and is left to the gate after the stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm.data.crops import mask_bbox
from ldm.data.volume import Geometry
from ldm.lesion import AGREE, DISAGREE
from inference.candidates import Agreement, JudgedCase
from inference.options import InferenceOptions
from quality.gate import grade
from quality.measure import LesionQuality, _measure_lesion
from quality.tolerances import Tolerances, resolve_tolerances

STAGE_ATTRIBUTES = {
    "lmnet": ("lesion location", "size", "shape", "cavity", "relationship with adjacent organs"),
    "linet": ("CT value", "density", "density variations", "specific features", "surface characteristics",
              "enhancement status"),
}
STAGE_CHECKS = {"lmnet": ("inside_organ", "volume", "extent", "components"), "linet": ("hu", "density")}
STATED_BY_ATTRIBUTE = {"extent": "size", "hu": "CT value", "density": "density"}


@dataclass(frozen=True)
class _InMemory:
    """The volumes :func:`quality.measure._measure_lesion` reads, from memory instead of files."""

    ct: np.ndarray
    inpainted: np.ndarray
    seg: np.ndarray | None
    geometry: Geometry


@dataclass(frozen=True)
class GateJudge:
    """Judges one candidate with the gate's checks and attributes of its stage (module docstring)."""

    tolerances: Tolerances

    def measure(self, case: JudgedCase, image: np.ndarray, lesion: np.ndarray, lesions: np.ndarray) -> LesionQuality:
        """The graded :class:`LesionQuality` of ``lesion`` (boolean, full volume) in ``image`` (HU)."""
        volumes = _InMemory(case.ct, image, case.seg, case.geometry)
        # A bool array viewed as uint8 is the component map with this lesion as label 1, without a copy.
        measured = _measure_lesion(volumes, case.report, Path(case.report_path), lesion.view(np.uint8), 1,
                                   mask_bbox(lesion), lesions, self.tolerances)
        quality = LesionQuality(case="", output="", mask="", lesion=0, components=1, changed_outside_voxels=0,
                                changed_outside_max_abs_hu=0.0, **measured)
        return grade(quality, self.tolerances)

    def __call__(self, stage: str, case: JudgedCase, image: np.ndarray, lesion: np.ndarray,
                 lesions: np.ndarray) -> Agreement:
        quality = self.measure(case, image, lesion, lesions)
        verdicts = {name: getattr(quality.verdict(name), "verdict", None) for name in STAGE_ATTRIBUTES[stage]}
        checks = {name: quality.checks[name] for name in STAGE_CHECKS[stage]}
        counted = {name: verdict for name, verdict in checks.items() if name not in STATED_BY_ATTRIBUTE}
        agree = [name for name, verdict in verdicts.items() if verdict == AGREE]
        agree += [name for name, verdict in counted.items() if verdict is True]
        disagree = [name for name, verdict in verdicts.items() if verdict == DISAGREE]
        disagree += [name for name, verdict in counted.items() if verdict is False]
        failing = [name for name, verdict in checks.items() if verdict is False]
        if "attributes" not in self.tolerances.disabled:
            failing += [name for name, verdict in verdicts.items()
                        if verdict == DISAGREE and name in self.tolerances.fail_attributes]
        return Agreement(tuple(agree), tuple(disagree), tuple(failing),
                         quality.hu_error if stage == "linet" else None)


def lesion_judge(options: InferenceOptions) -> GateJudge:
    """The judge of a run (``inference.runner.run_inference(..., judge=lesion_judge)``): the gate's tolerances from
    ``EXP_DIR/quality.toml`` when present, else the defaults."""
    return GateJudge(resolve_tolerances(options.exp_dir))
