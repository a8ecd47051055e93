"""One description of a lesion: measure it in a CT with its organ segmentation, say it in report phrases, and
compare it with what a report asked for. Dataset preparation (real lesions -> ``type.json``), the quality gate
(synthetic lesions -> agreement with their request) and ``describe.py`` all go through here.

Public API (arrays share one grid and axis order; ``spacing`` in mm along those axes)::

    from ldm.lesion import Request, compare, describe_lesion

    description = describe_lesion(ct_hu, lesion_mask, seg_v1, spacing, organ_id=None,
                                  voxel_mm3=None, file_axes=None, lesions=None, organ=None,
                                  thresholds=DEFAULT)
    description.measurement      # LesionMeasurement: every number behind the phrases (HU, mm, mm3, voxels)
    description.phrases.values   # {attribute: "phrase,"} in the vocabulary of description.json, plus cavity
    description.phrases.undecided  # attributes the image could not decide (their fallback phrase is in values)
    description.organ_id, description.located_organ_id  # organ described / organ holding most of the lesion

    verdicts = compare(Request(organ_id, attributes, size_vox, ct_value_hu), description, thresholds)
    [(v.attribute, v.requested, v.measured, v.verdict, v.reason) for v in verdicts]  # agree / disagree / n/a

- ``ct_hu``: HU (any float dtype); ``lesion_mask``: the one lesion (boolean); ``seg_v1``: TotalSegmentator v1
  ids (:func:`ldm.data.organs.to_v1` converts v2); ``organ_id``: the organ to describe the lesion in (default:
  the one holding most of it); ``voxel_mm3``: ``|det(affine)|`` (:func:`ldm.data.components.voxel_volume_mm3`);
  ``file_axes[a]``: the array axis holding file axis ``a``, so ``size_vox`` counts along the file's axes;
  ``lesions``: every lesion voxel (excluded from the organ reference; default the lesion); ``organ``: the organ's
  voxels (default: the organ's ids in ``seg_v1``, every lung lobe for a lobe).
- Components: :func:`ldm.data.components.ranked_components` numbers lesions largest first, as every stage does.
- Definitions: :mod:`ldm.lesion.measure`; phrases: :mod:`ldm.lesion.phrases`; agreement: :mod:`ldm.lesion.compare`;
  every threshold: :mod:`ldm.lesion.thresholds`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from ldm.data.components import FACE_CONNECTIVITY
from ldm.data.organs import is_lung, organ_name
from ldm.errors import DataError
from ldm.lesion.compare import AGREE, ATTRIBUTES, DISAGREE, NOT_APPLICABLE, Request, Verdict, compare
from ldm.lesion.measure import LesionMeasurement, measure_lesion
from ldm.lesion.phrases import Phrases, measured_phrases
from ldm.lesion.thresholds import DEFAULT, Thresholds

__all__ = ["AGREE", "ATTRIBUTES", "DEFAULT", "DISAGREE", "NOT_APPLICABLE", "LesionDescription", "LesionMeasurement",
           "Phrases", "Request", "Thresholds", "Verdict", "compare", "describe_lesion", "located_organ",
           "organ_voxels"]


@dataclass
class LesionDescription:
    """What the scan shows about one lesion: the organ it is described in, the organ holding most of it, every
    measurement and the phrases they give."""

    organ_id: int
    located_organ_id: int | None
    measurement: LesionMeasurement
    phrases: Phrases


def located_organ(lesion: np.ndarray, segmentation: np.ndarray) -> int | None:
    """The v1 organ id holding most lesion voxels; when none is under the lesion, the most frequent one in its
    one-voxel outer shell (a lesion the segmentation left out); None when neither touches an organ."""
    for voxels in (segmentation[lesion], segmentation[ndimage.binary_dilation(lesion, FACE_CONNECTIVITY) & ~lesion]):
        ids = voxels[voxels > 0].astype(np.int64)
        if ids.size:
            return int(np.bincount(ids).argmax())
    return None


def organ_voxels(segmentation: np.ndarray, organ_id: int) -> np.ndarray:
    """Boolean mask of organ ``organ_id`` in a v1 segmentation (a lung lobe: every lung lobe)."""
    if is_lung(organ_id):
        return np.isin(segmentation, [i for i in np.unique(segmentation) if i > 0 and is_lung(int(i))])
    return segmentation == organ_id


def describe_lesion(ct_hu: np.ndarray, lesion_mask: np.ndarray, seg_v1: np.ndarray, spacing: Sequence[float],
                    organ_id: int | None = None, voxel_mm3: float | None = None,
                    file_axes: Sequence[int] | None = None, lesions: np.ndarray | None = None,
                    organ: np.ndarray | None = None, thresholds: Thresholds = DEFAULT) -> LesionDescription:
    """Measure one lesion and phrase it (module docstring). DataError when the lesion is empty, no organ is
    given or found, or the organ has no voxel outside the lesions."""
    lesion = np.asarray(lesion_mask, dtype=bool)
    if not lesion.any():
        raise DataError("the lesion mask holds no voxel")
    seg_v1 = np.asarray(seg_v1)
    located = located_organ(lesion, seg_v1)
    organ_id = located if organ_id is None else int(organ_id)
    if organ_id is None:
        raise DataError("no segmented organ under or around the lesion; name the organ it lies in")
    organ = organ_voxels(seg_v1, organ_id) if organ is None else np.asarray(organ, dtype=bool)
    lesions = lesion if lesions is None else np.asarray(lesions, dtype=bool)
    if not (organ & ~lesions).any():
        raise DataError(f"the segmentation holds no {organ_name(organ_id)} voxel outside the lesions")
    measurement = measure_lesion(ct_hu, lesion, lesions, organ, seg_v1, organ_id, spacing, thresholds, voxel_mm3,
                                 file_axes)
    return LesionDescription(organ_id, located, measurement, measured_phrases(measurement, organ_id, thresholds))
