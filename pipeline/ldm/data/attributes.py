"""Structured reports (``type.json``) -> the attribute dicts that become LesionDiffusion's text condition.

A report maps TotalSegmentator **v1** organ ids (strings) to ``[shape, "", {attributes}, [[bbox], [size]]]``;
only element ``[2]`` (the attribute dict, values are lower-case phrases ending in a comma) is used here. The
text encoder embeds each attribute value separately, in dict order, so the order of the returned dicts matters:
reassigned keys keep their slot, ``cavity`` is always last.

Organ-key selection (several organs in one report): the key whose organ overlaps the lesion most in the
segmentation; ties (including no overlap at all) go to the organ with more voxels in the segmentation, then to
the earlier key in the report. Without a segmentation the first key is used. (The original picked at random, or
crashed when no organ overlapped.)

``cavity`` (LMNet only): the report's own value when present, normalised to one of :data:`CAVITY_PHRASES`;
otherwise a rule on the organ and the masks, never on directory names (the original parsed the path):

- hollow organ (:func:`ldm.data.organs.is_hollow`): ``"within the lumen of a hollow organ,"`` when any attribute
  mentions a stone or calculus, else ``"wall thickening,"``;
- solid organ: ``"within the parenchymal organ,"`` when at least :data:`WITHIN_ORGAN_FRACTION` of the lesion's
  one-voxel outer shell (face neighbours) lies in the organ or in another lesion voxel, else
  ``"protruding from the parenchymal organ,"``. Shell voxels outside the array are not counted.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from scipy import ndimage

from ldm.data.crops import mask_bbox
from ldm.data.organs import is_hollow, is_lung, organ_name, organ_names
from ldm.errors import DataError

ATTRIBUTES_INDEX = 2
CAVITY_KEY = "cavity"
# The four values of the ``cavity`` attribute (original preprocess.py), bare and as reports write them.
HOLLOW_CAVITIES = ("within the lumen of a hollow organ", "wall thickening")
SOLID_CAVITIES = ("within the parenchymal organ", "protruding from the parenchymal organ")
CAVITY_PHRASES = tuple(f"{phrase}," for phrase in HOLLOW_CAVITIES + SOLID_CAVITIES)
WITHIN_ORGAN_FRACTION = 0.9
STONE_WORDS = ("stone", "calculus", "calculi")
# Dropped from the LMNet text: the mask model is conditioned on shape/location, not on intensity or size.
LMNET_DROPPED = ("size", "CT value", "density", "density variations", CAVITY_KEY)
# LINet was trained without `cavity` (9 attributes); keeping it would shift the text away from training.
LINET_DROPPED = ("size", CAVITY_KEY)
_CT_VALUE = re.compile(r"(-?\d+(?:\.\d+)?)\s*hu\b", re.IGNORECASE)


def validate_report(report: Any, source: str | os.PathLike = "report") -> dict[str, list]:
    """Check the report structure; returns it unchanged. DataError naming ``source`` and the bad key otherwise."""
    if not isinstance(report, dict) or not report:
        raise DataError(
            f"{source}: a report must be a non-empty JSON object mapping organ ids to [shape, '', {{attributes}}, ...]"
        )
    known = organ_names()
    for key, entry in report.items():
        if not str(key).isdigit() or int(key) not in known:
            raise DataError(f"{source}: key {key!r} is not a TotalSegmentator v1 organ id (1..{len(known)})")
        has_attributes = isinstance(entry, list) and len(entry) > ATTRIBUTES_INDEX
        if not has_attributes or not isinstance(entry[ATTRIBUTES_INDEX], dict):
            raise DataError(f"{source}: report[{key!r}] must be a list whose element [2] is the attribute object")
        for name, value in entry[ATTRIBUTES_INDEX].items():
            if name != "size" and not isinstance(value, str):
                raise DataError(f"{source}: report[{key!r}][2][{name!r}] must be a string, got {type(value).__name__}")
    return report


def read_report(path: str | os.PathLike) -> dict[str, list]:
    """Read and validate a ``type.json`` report; returns the parsed dict (key order as in the file)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: report file not found")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the report ({error})") from None
    return validate_report(report, path)


def report_attributes(report: Mapping[str, list], key: str) -> dict[str, Any]:
    """A copy of the attribute dict (element [2]) of organ ``key``."""
    return dict(report[key][ATTRIBUTES_INDEX])


def select_organ_key(report: Mapping[str, list], lesion_mask: np.ndarray | None = None,
                     segmentation: np.ndarray | None = None) -> str:
    """The report key (v1 organ id string) that describes the lesion; see the module docstring for the rule."""
    keys = list(report)
    if len(keys) == 1 or lesion_mask is None or segmentation is None:
        return keys[0]
    under_lesion = segmentation[np.asarray(lesion_mask, dtype=bool)]

    def score(key: str) -> tuple[int, int]:
        return int(np.count_nonzero(under_lesion == int(key))), int(np.count_nonzero(segmentation == int(key)))

    # max() keeps the first of equal candidates, i.e. the earlier report key.
    return max(keys, key=score)


def organ_mask(segmentation: np.ndarray, report: Mapping[str, list], key: str) -> np.ndarray:
    """Boolean mask of organ ``key`` in a v1 segmentation; a lung lobe gives the union of the report's lung lobes."""
    if is_lung(int(key)):
        lobes = [int(other) for other in report if is_lung(int(other))]
        return np.isin(segmentation, lobes)
    return segmentation == int(key)


def normalise_cavity(value: str, source: str | os.PathLike = "report") -> str:
    """One of :data:`CAVITY_PHRASES` for a report value (case, spacing and the trailing comma are ignored)."""
    text = " ".join(str(value).lower().split()).rstrip(",").strip()
    for phrase in CAVITY_PHRASES:
        if text == phrase.rstrip(","):
            return phrase
    raise DataError(f"{source}: cavity {value!r} is not one of {', '.join(repr(p) for p in CAVITY_PHRASES)}")


def mentions_stone(attributes: Mapping[str, Any]) -> bool:
    """True when any attribute value mentions a stone or calculus."""
    return any(word in value.lower() for value in attributes.values() if isinstance(value, str) for word in STONE_WORDS)


def shell_fraction_in_organ(lesion_mask: np.ndarray, organ: np.ndarray) -> float:
    """Fraction of the lesion's outer face-neighbour shell that lies in ``organ`` (1.0 when there is no shell)."""
    lesion_mask = np.asarray(lesion_mask, dtype=bool)
    if not lesion_mask.any():
        raise DataError("the lesion mask is empty: cannot place the lesion relative to its organ")
    window = tuple(slice(max(box.start - 1, 0), min(box.stop + 1, size))
                   for box, size in zip(mask_bbox(lesion_mask), lesion_mask.shape))
    lesion = lesion_mask[window]
    shell = ndimage.binary_dilation(lesion, structure=ndimage.generate_binary_structure(3, 1)) & ~lesion
    shell_size = int(shell.sum())
    return 1.0 if shell_size == 0 else float((shell & organ[window]).sum()) / shell_size


def cavity_from_rule(organ_id: int | str, attributes: Mapping[str, Any], lesion_mask: np.ndarray,
                     organ: np.ndarray, all_lesions: np.ndarray | None = None) -> str:
    """The ``cavity`` phrase derived from the organ kind and the masks (module docstring rule).

    ``lesion_mask``: the lesion component described; ``organ``: its organ mask (same shape); ``all_lesions``:
    every lesion voxel, counted as inside (a lesion touching another lesion is not protruding).
    """
    if is_hollow(int(organ_id)):
        return CAVITY_PHRASES[0] if mentions_stone(attributes) else CAVITY_PHRASES[1]
    inside = organ if all_lesions is None else (organ | all_lesions)
    within = shell_fraction_in_organ(lesion_mask, inside) >= WITHIN_ORGAN_FRACTION
    return CAVITY_PHRASES[2] if within else CAVITY_PHRASES[3]


def resolve_cavity(organ_id: int | str, attributes: Mapping[str, Any], lesion_mask: np.ndarray, organ: np.ndarray,
                   all_lesions: np.ndarray | None = None, source: str | os.PathLike = "report") -> str:
    """The report's ``cavity`` (normalised) when it has a non-empty one, otherwise :func:`cavity_from_rule`."""
    value = attributes.get(CAVITY_KEY)
    if isinstance(value, str) and value.strip():
        return normalise_cavity(value, source)
    return cavity_from_rule(organ_id, attributes, lesion_mask, organ, all_lesions)


def short_ct_value(value: str, source: str | os.PathLike = "report") -> str:
    """``"... approximately 57 HU,"`` or ``"57 HU,"`` -> ``"57.0 HU,"`` (the form LINet was trained on)."""
    match = _CT_VALUE.search(str(value))
    if match is None:
        raise DataError(f"{source}: 'CT value' {value!r} holds no '<number> HU'")
    return f"{float(match.group(1))} HU,"


def lmnet_attributes(attributes: Mapping[str, Any], organ_id: int | str, cavity: str) -> dict[str, str]:
    """LMNet text: location <- organ name; size, CT value, density, density variations and an empty
    ``specific features`` dropped; ``cavity`` appended last."""
    text = dict(attributes)
    text["lesion location"] = organ_name(organ_id)
    for key in LMNET_DROPPED:
        text.pop(key, None)
    if not str(text.get("specific features", "-")).strip():
        del text["specific features"]
    text[CAVITY_KEY] = cavity
    return text


def linet_attributes(attributes: Mapping[str, Any], organ_id: int | str,
                     source: str | os.PathLike = "report") -> dict[str, str]:
    """LINet / VQ text: location <- organ name; size and cavity dropped; ``CT value`` -> ``"<float> HU,"``."""
    text = dict(attributes)
    text["lesion location"] = organ_name(organ_id)
    for key in LINET_DROPPED:
        text.pop(key, None)
    if "CT value" in text:
        text["CT value"] = short_ct_value(text["CT value"], source)
    return text
