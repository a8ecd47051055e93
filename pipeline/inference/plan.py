"""Which lesion boxes (LMNet) or lesions (LINet) of a case are processed, the crop around each, and their seeds.

Components are face-connected regions of ``label == 2``, largest first (ties: scan order). Components larger
than ``min_voxels`` are kept, at most ``max_count``; when none is that large, the largest alone is kept (the
original rule, with 50 voxels and ``max_mask_num``).

Seeds: every random draw of a lesion comes from ``SeedSequence([seed, stage, case row, lesion, attempt])``, so a
case gives the same result whatever process or GPU handles it and whichever other cases run. Best of K and
resampling (:mod:`inference.candidates`) number a lesion's samples ``draw`` 0, 1, ...: draw 0 is the seed above,
draw ``d > 0`` appends ``d`` to the sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from ldm.data.components import ranked_components
from ldm.data.crops import CropWindow, mask_bbox, plan_crop
from ldm.errors import DataError

LESION_VALUE = 2
STAGE_IDS = {"lmnet": 1, "linet": 2}


@dataclass(frozen=True)
class Component:
    """One lesion (box) of a case: its rank (0 = largest), voxel mask ``(z, y, x)``, bounding box and crop."""

    rank: int
    mask: np.ndarray
    bbox: tuple[slice, slice, slice]
    window: CropWindow

    @property
    def voxels(self) -> int:
        return int(self.mask.sum())

    @property
    def extent(self) -> tuple[int, int, int]:
        """Bounding-box size in voxels ``(z, y, x)``."""
        return tuple(box.stop - box.start for box in self.bbox)

    def box_mask(self) -> np.ndarray:
        """The component's bounding box filled with True (full-volume shape)."""
        box = np.zeros(self.mask.shape, dtype=bool)
        box[self.bbox] = True
        return box


def select_components(label: np.ndarray, max_count: int, min_voxels: int) -> list[np.ndarray]:
    """Boolean masks of the kept components of ``label == 2``, largest first (module docstring rule)."""
    lesion = np.asarray(label) == LESION_VALUE
    if not lesion.any():
        raise DataError(f"no lesion voxel (value {LESION_VALUE}) in the label")
    components, ranked, boxes = ranked_components(lesion)
    sizes = {label: int(np.count_nonzero(components[boxes[label - 1]] == label)) for label in ranked}
    kept = [label for label in ranked if sizes[label] > min_voxels][:max_count] or ranked[:1]
    return [components == label for label in kept]


def fit_problem(extent: Sequence[int], crop_size: Sequence[int], margin: Sequence[int], what: str) -> str | None:
    """Why a lesion (box) of ``extent`` voxels ``(z, y, x)`` plus ``margin`` voxels on each side does not fit a crop
    of ``crop_size``, or None when it fits."""
    needed = [int(size) + 2 * int(m) for size, m in zip(extent, margin)]
    if all(size <= crop for size, crop in zip(needed, crop_size)):
        return None
    return (f"{what} spans {[int(e) for e in extent]} voxels (z, y, x); with a margin of {[int(m) for m in margin]} "
            f"it needs {needed}, more than the crop {[int(c) for c in crop_size]}: raise inference.crop_size or "
            "ask for a smaller lesion")


def plan_components(label: np.ndarray, crop_size: Sequence[int], max_count: int, min_voxels: int,
                    margin: int | Sequence[int] = 0) -> list[Component]:
    """The kept components with a crop of ``crop_size`` centred on each bounding box.

    ``margin``: voxels needed around a component on each side (one number, or one per axis ``(z, y, x)``).
    Raises DataError when a component plus its margin does not fit in the crop.
    """
    margin = (int(margin),) * 3 if np.isscalar(margin) else tuple(int(m) for m in margin)
    planned = []
    for rank, mask in enumerate(select_components(label, max_count, min_voxels)):
        bbox = mask_bbox(mask)
        # (start + stop) // 2 centres an even extent so that a box exactly as large as the crop still fits.
        window = plan_crop(mask.shape, crop_size, [(box.start + box.stop) // 2 for box in bbox])
        problem = fit_problem([box.stop - box.start for box in bbox], crop_size, margin, f"lesion {rank}")
        if problem:
            raise DataError(problem)
        inside = [max(box.start - m, 0) >= start - pad and min(box.stop + m, full) <= start - pad + crop
                  for box, m, start, pad, crop, full in zip(bbox, margin, window.crop_start, window.pad_before,
                                                            crop_size, mask.shape)]
        if not all(inside):
            raise DataError(f"lesion {rank} at {[(b.start, b.stop) for b in bbox]} cannot be centred in a crop of "
                            f"{list(crop_size)}")
        planned.append(Component(rank, mask, bbox, window))
    return planned


def lesion_seed(seed: int, stage: str, case_index: int, lesion: int, attempt: int = 0, draw: int = 0) -> int:
    """A 63-bit seed for one lesion, attempt and draw, independent of the other cases (module docstring)."""
    entropy = [int(seed), STAGE_IDS[stage], int(case_index), int(lesion), int(attempt)]
    sequence = np.random.SeedSequence(entropy + ([int(draw)] if draw else []))
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
