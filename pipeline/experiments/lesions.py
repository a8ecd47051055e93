"""Lesion-wise scores of one predicted segmentation against its reference: Dice, found lesions, false positives.

Rules (stated once, used everywhere):

- a **lesion** is a face-connected component of the lesion label (as in :mod:`quality.measure`), in the
  reference and in the prediction alike; two reference lesions that touch by a face are one lesion;
- a reference lesion is **found** when the predicted lesion voxels inside it cover at least ``min_overlap``
  (default 10 %) of its voxels; all predicted components count together, so a lesion predicted in pieces is
  found once, and one predicted component covering two reference lesions can find both;
- a predicted component is a **false positive** when it touches no reference lesion voxel;
- a lesion's **size** is its equivalent diameter ``(6 V / pi)^(1/3)`` in mm (``V`` from the voxel spacing), in
  the bins ``< 10 mm``, ``10-20 mm`` (both ends included) and ``> 20 mm``; a false positive falls in the bin of
  its own size;
- **Dice** of the lesion label over the whole case: ``2 |P & R| / (|P| + |R|)``, 1 when both are empty.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ldm.data.components import FACE_CONNECTIVITY
from quality.plot import equivalent_diameter_mm

SIZE_BINS = ("<10 mm", "10-20 mm", ">20 mm")
DEFAULT_MIN_OVERLAP = 0.1


def size_bin(diameter_mm: float) -> str:
    """The size bin of an equivalent diameter in mm."""
    if diameter_mm < 10.0:
        return SIZE_BINS[0]
    return SIZE_BINS[1] if diameter_mm <= 20.0 else SIZE_BINS[2]


@dataclass
class CaseScore:
    """One case: Dice, and per size bin the reference lesions, those found and the false-positive components;
    ``diameters_mm``: the reference lesions' equivalent diameters, with ``found`` beside them."""

    dice: float
    lesions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SIZE_BINS, 0))
    found: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SIZE_BINS, 0))
    false_positives: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SIZE_BINS, 0))
    diameters_mm: list[float] = field(default_factory=list)
    found_flags: list[bool] = field(default_factory=list)


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean maps; 1.0 when both are empty."""
    total = int(prediction.sum()) + int(reference.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(prediction & reference)) / total


def score_case(prediction: np.ndarray, reference: np.ndarray, spacing_mm, min_overlap: float = DEFAULT_MIN_OVERLAP
               ) -> CaseScore:
    """Score boolean lesion maps of one grid (``spacing_mm`` per axis, in the arrays' axis order) by the rules of
    the module docstring."""
    voxel_mm3 = float(np.prod(spacing_mm))
    score = CaseScore(dice(prediction, reference))
    reference_ids, n_reference = ndimage.label(reference, structure=FACE_CONNECTIVITY)
    if n_reference:
        sizes = np.bincount(reference_ids.ravel(), minlength=n_reference + 1)[1:]
        covered = np.bincount(reference_ids[prediction], minlength=n_reference + 1)[1:]
        for voxels, hit in zip(sizes, covered):
            diameter = equivalent_diameter_mm(voxels * voxel_mm3)
            found = bool(hit >= min_overlap * voxels and hit > 0)
            score.lesions[size_bin(diameter)] += 1
            score.found[size_bin(diameter)] += int(found)
            score.diameters_mm.append(round(diameter, 2))
            score.found_flags.append(found)
    predicted_ids, n_predicted = ndimage.label(prediction, structure=FACE_CONNECTIVITY)
    if n_predicted:
        sizes = np.bincount(predicted_ids.ravel(), minlength=n_predicted + 1)[1:]
        touching = np.bincount(predicted_ids[reference], minlength=n_predicted + 1)[1:]
        for voxels, hit in zip(sizes, touching):
            if hit == 0:
                score.false_positives[size_bin(equivalent_diameter_mm(voxels * voxel_mm3))] += 1
    return score
