"""Organ ids and names: TotalSegmentator v1 order (the order LesionDiffusion was trained on), v2 -> v1 conversion.

One source of truth: ``pipeline/organ_type.json`` (v1 id -> organ name with spaces, e.g. ``"urinary bladder"``)
and ``pipeline/totalseg_labels.json`` (v1 and v2 class names). A TotalSegmentator 2.x segmentation is converted
to v1 by class name, as TotalSegmentator's own ``v1_order`` option does; v2 classes without a v1 counterpart
(e.g. ``heart``, ``prostate``) become background.
"""
from __future__ import annotations

import difflib
import json
from functools import lru_cache

import numpy as np

from ldm.errors import DataError
from ldm.util import PIPELINE_DIR

ORGAN_TYPE_FILE = PIPELINE_DIR / "organ_type.json"
TOTALSEG_LABELS_FILE = PIPELINE_DIR / "totalseg_labels.json"
NUM_V1_CLASSES = 104

# Hollow organs: lesions sit in the lumen or thicken the wall (placement rule and `cavity` attribute).
# The original used {urinary bladder, stomach, colon, esophagus} for placement and also "gall" in the loader.
HOLLOW_ORGANS = frozenset({"esophagus", "stomach", "duodenum", "small bowel", "colon", "urinary bladder", "gallbladder"})
# Lung lobes: a lung lesion's organ mask is the union of the lobes named in the report (original loader rule).
LUNG_LOBES = frozenset(
    {"lung upper lobe left", "lung lower lobe left", "lung upper lobe right", "lung middle lobe right", "lung lower lobe right"}
)


def normalise_organ_name(name: str) -> str:
    """Lower-case, underscores to spaces, single spaces: ``"Kidney_Right "`` -> ``"kidney right"``."""
    return " ".join(str(name).replace("_", " ").lower().split())


@lru_cache(maxsize=None)
def organ_names() -> dict[int, str]:
    """TotalSegmentator v1 id -> organ name (from ``pipeline/organ_type.json``)."""
    with open(ORGAN_TYPE_FILE) as handle:
        return {int(key): normalise_organ_name(value) for key, value in json.load(handle).items()}


def organ_name(organ_id: int | str) -> str:
    """Name of a v1 organ id; DataError for an unknown id."""
    try:
        return organ_names()[int(organ_id)]
    except (KeyError, ValueError):
        raise DataError(f"organ id {organ_id!r} is not a TotalSegmentator v1 label (1..{NUM_V1_CLASSES})") from None


def organ_id(name: str) -> int:
    """v1 id of an organ name (case, spaces and underscores are ignored); DataError with suggestions otherwise."""
    wanted = normalise_organ_name(name)
    by_name = {value: key for key, value in organ_names().items()}
    if wanted in by_name:
        return by_name[wanted]
    close = difflib.get_close_matches(wanted, list(by_name), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f" (see {ORGAN_TYPE_FILE.name})"
    raise DataError(f"unknown organ name {name!r}{hint}")


def is_hollow(organ: int | str) -> bool:
    """True for hollow organs (by v1 id or name)."""
    name = organ_name(organ) if isinstance(organ, int) or str(organ).isdigit() else normalise_organ_name(organ)
    return name in HOLLOW_ORGANS


def is_lung(organ: int | str) -> bool:
    """True for a lung lobe (by v1 id or name)."""
    name = organ_name(organ) if isinstance(organ, int) or str(organ).isdigit() else normalise_organ_name(organ)
    return name in LUNG_LOBES


@lru_cache(maxsize=None)
def _class_names(version: str) -> dict[int, str]:
    with open(TOTALSEG_LABELS_FILE) as handle:
        table = json.load(handle)[version]
    return {int(key): normalise_organ_name(value) for key, value in table.items()}


@lru_cache(maxsize=None)
def v2_to_v1_table() -> np.ndarray:
    """Lookup table ``lut[v2_id] = v1_id`` (0 where v2 has no v1 counterpart), length 256."""
    v1_by_name = {name: key for key, name in _class_names("v1").items()}
    table = np.zeros(256, dtype=np.int16)
    for key, name in _class_names("v2").items():
        table[key] = v1_by_name.get(name, 0)
    table.setflags(write=False)
    return table


def convert_v2_to_v1(segmentation: np.ndarray) -> np.ndarray:
    """Relabel a TotalSegmentator v2 label map into v1 ids (int16, same shape)."""
    segmentation = np.asarray(segmentation)
    if segmentation.size and (segmentation.min() < 0 or segmentation.max() > 255):
        raise DataError(f"segmentation values {segmentation.min()}..{segmentation.max()} are not TotalSegmentator labels")
    return v2_to_v1_table()[segmentation.astype(np.int64)]


def to_v1(segmentation: np.ndarray, version: str = "v1") -> np.ndarray:
    """A label map in v1 ids: returned as int16 for ``version='v1'``, converted for ``'v2'``."""
    if version == "v1":
        return np.asarray(segmentation, dtype=np.int16)
    if version == "v2":
        return convert_v2_to_v1(segmentation)
    raise DataError(f"unknown TotalSegmentator label version {version!r} (expected 'v1' or 'v2')")
