"""The judge of best of K and resampling (:mod:`inference.candidates`): the quality gate's checks on one candidate.

A candidate is measured in memory exactly as :func:`quality.measure.measure_output` measures a written output
(same definitions, same tolerances from ``EXP_DIR/quality.toml`` or the defaults) and graded by
:func:`quality.gate.grade`; only the checks its stage decides count:

- LMNet (a mask): ``inside_organ``, ``volume``, ``extent``, ``components`` (always one: LMNet keeps the largest
  part of its sample);
- LINet (the inpainted lesion): ``hu``, ``density``.

``unchanged_outside`` is a property of a whole written output (the paste cannot change anything beyond its rim)
and is left to the gate after the stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm.data.crops import mask_bbox
from inference.candidates import Agreement, JudgedCase
from inference.options import InferenceOptions
from quality.gate import grade
from quality.measure import LesionQuality, _measure_lesion
from quality.tolerances import Tolerances, resolve_tolerances

STAGE_CHECKS = {"lmnet": ("inside_organ", "volume", "extent", "components"), "linet": ("hu", "density")}


@dataclass(frozen=True)
class _InMemory:
    """The volumes :func:`quality.measure._measure_lesion` reads, from memory instead of files."""

    ct: np.ndarray
    inpainted: np.ndarray
    seg: np.ndarray | None
    geometry: object


@dataclass(frozen=True)
class GateJudge:
    """Judges one candidate with the gate's checks of its stage (module docstring)."""

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
        names = STAGE_CHECKS[stage]
        disagree = tuple(name for name in names if quality.checks[name] is False)
        # Every check of the gate fails a lesion (disabled checks are n/a), so what disagrees is what fails.
        return Agreement(agree=tuple(name for name in names if quality.checks[name] is True), disagree=disagree,
                         failing=disagree, hu_error=quality.hu_error if stage == "linet" else None)


def lesion_judge(options: InferenceOptions) -> GateJudge:
    """The judge of a run (``inference.runner.run_inference(..., judge=lesion_judge)``): the gate's tolerances from
    ``EXP_DIR/quality.toml`` when present, else the defaults."""
    return GateJudge(resolve_tolerances(options.exp_dir))
