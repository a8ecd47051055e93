"""Lesion boxes: where a box of the report's size goes inside its organ (the original's rules, made fast and exact).

Arrays are ``(z, y, x)``; a box is ``(start, stop)`` voxel indices per axis with ``stop`` exclusive, so its extent
is exactly the requested size. The box is centred on a chosen voxel ``c`` as ``start = c - size // 2`` and then
shifted (clamped) to lie inside the image. Where the centre may go depends on the ``cavity``:

- hollow organ, ``within the lumen of a hollow organ``: the organ eroded 5 times (6-connectivity), i.e. away
  from the wall (the whole organ when that leaves nothing);
- hollow organ, ``wall thickening``: the organ minus that eroded lumen (a 5-voxel shell);
- solid organ, ``within the parenchymal organ``: the whole box inside the organ. Candidates come from a
  separable minimum filter of the organ mask with the box size (exact, linear time), not from a scan;
- solid organ, ``protruding from the parenchymal organ``: the organ's surface voxels, so the box crosses it.

Several boxes never overlap and keep at least one voxel between them, so that each stays a separate connected
component for inference. All randomness comes from the ``numpy.random.Generator`` passed in.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from ldm.errors import DataError
from ldm.data.attributes import HOLLOW_CAVITIES, SOLID_CAVITIES
from ldm.data.vocabulary import clean_phrase

LUMEN_EROSIONS = 5
BOX_GAP = 1
BOX_VALUE = 2
FACE_CONNECTIVITY = ndimage.generate_binary_structure(3, 1)
Box = tuple[tuple[int, int, int], tuple[int, int, int]]


class BoxPlacementError(DataError):
    """No box of the requested size fits where the rule puts it."""


def organ_extent(organ: np.ndarray) -> tuple[int, int, int]:
    """Size in voxels of the organ's bounding box along ``(z, y, x)`` (``max - min + 1``)."""
    positions = np.argwhere(organ)
    if positions.size == 0:
        raise DataError("the organ mask is empty")
    return tuple(int(e) for e in positions.max(axis=0) - positions.min(axis=0) + 1)


def placement_rule(cavity: str | None, hollow: bool) -> str:
    """``"lumen"``, ``"wall"``, ``"within"`` or ``"surface"`` for a cavity phrase (the organ kind's default if None)."""
    text = clean_phrase(cavity or "")
    if text == HOLLOW_CAVITIES[1]:
        return "wall"
    if text == SOLID_CAVITIES[1]:
        return "surface"
    if text == HOLLOW_CAVITIES[0] or (not text and hollow):
        return "lumen"
    if text == SOLID_CAVITIES[0] or not text:
        return "within"
    raise DataError(f"cavity {cavity!r} is not one of {', '.join(repr(c) for c in HOLLOW_CAVITIES + SOLID_CAVITIES)}")


def _organ_window(organ: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
    positions = np.argwhere(organ)
    if positions.size == 0:
        raise DataError("the organ mask is empty")
    low, high = positions.min(axis=0), positions.max(axis=0) + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high)), low


def centre_candidates(organ: np.ndarray, size_zyx: Sequence[int], rule: str) -> np.ndarray:
    """Boolean mask (same shape as ``organ``) of the voxels a box centre may take under ``rule``."""
    organ = np.asarray(organ, dtype=bool)
    if rule == "within":
        inside = organ.astype(np.uint8)
        for axis, size in enumerate(size_zyx):
            inside = ndimage.minimum_filter1d(inside, int(size), axis=axis, mode="constant", cval=0)
        return inside.astype(bool)
    if rule == "surface":
        return organ & ~ndimage.binary_erosion(organ, FACE_CONNECTIVITY)
    lumen = ndimage.binary_erosion(organ, FACE_CONNECTIVITY, iterations=LUMEN_EROSIONS)
    if rule == "lumen":
        return lumen if lumen.any() else organ
    if rule == "wall":
        wall = organ & ~lumen
        return wall if wall.any() else organ
    raise DataError(f"unknown box placement rule {rule!r}")


def _clamped_starts(centres: np.ndarray, size: np.ndarray, shape: np.ndarray) -> np.ndarray:
    return np.clip(centres - size // 2, 0, shape - size)


def _clear_of(starts: np.ndarray, size: np.ndarray, placed: list[Box]) -> np.ndarray:
    free = np.ones(len(starts), dtype=bool)
    for box_start, box_stop in placed:
        touching = (starts < np.asarray(box_stop) + BOX_GAP) & (np.asarray(box_start) < starts + size + BOX_GAP)
        free &= ~touching.all(axis=1)
    return free


def _describe(size_zyx: Sequence[int]) -> str:
    return f"[{' '.join(str(int(s)) for s in size_zyx[::-1])}] (X Y Z)"


def place_boxes(organ: np.ndarray, size_zyx: Sequence[int], count: int, cavity: str | None, hollow: bool,
                rng: np.random.Generator, organ_label: str = "organ") -> list[Box]:
    """``count`` non-touching boxes of ``size_zyx`` voxels placed by the cavity rule; returns ``(start, stop)`` each.

    Raises BoxPlacementError naming the organ and the size when the organ is too small or has no room left.
    """
    shape = np.asarray(organ.shape)
    size = np.asarray([int(s) for s in size_zyx])
    if size.shape != (3,) or size.min() < 1:
        raise DataError(f"box size {list(size_zyx)} must be three positive voxel counts")
    if np.any(size > shape):
        raise BoxPlacementError(f"a box of {_describe(size)} voxels is larger than the image {_describe(shape)}")
    rule = placement_rule(cavity, hollow)
    window, offset = _organ_window(organ)
    candidates = np.argwhere(centre_candidates(organ[window], size, rule)) + offset
    if len(candidates) == 0:
        raise BoxPlacementError(f"organ {organ_label} too small for a box of {_describe(size)} voxels ({cavity or rule})")
    starts = _clamped_starts(candidates, size, shape)
    placed: list[Box] = []
    for number in range(count):
        free = np.flatnonzero(_clear_of(starts, size, placed))
        if len(free) == 0:
            raise BoxPlacementError(
                f"organ {organ_label} has room for only {number} of {count} separate boxes of {_describe(size)} voxels"
            )
        start = starts[free[rng.integers(len(free))]]
        placed.append((tuple(int(v) for v in start), tuple(int(v) for v in start + size)))
    return placed


def box_problem(organ: np.ndarray, size_zyx: Sequence[int], count: int, cavity: str | None, hollow: bool,
                organ_label: str = "organ") -> str | None:
    """None when ``count`` boxes of that size can be placed (tried with a fixed seed), else the reason."""
    try:
        place_boxes(organ, size_zyx, count, cavity, hollow, np.random.default_rng(0), organ_label)
    except BoxPlacementError as error:
        return str(error)
    return None


def boxes_mask(shape: Sequence[int], boxes: Sequence[Box], value: int = BOX_VALUE) -> np.ndarray:
    """uint8 ``(z, y, x)`` volume with ``value`` inside every box and 0 elsewhere."""
    mask = np.zeros(tuple(int(s) for s in shape), dtype=np.uint8)
    for start, stop in boxes:
        mask[tuple(slice(a, b) for a, b in zip(start, stop))] = value
    return mask
