"""Crops centred on a lesion, with padding, jitter and flips, and the bookkeeping to paste a crop back.

All arrays are ``(z, y, x)`` (optionally with leading channel axes for :func:`take_crop`). Coordinates:

- the volume is (virtually) padded by ``pad_before`` voxels at the start of an axis when it is shorter than the
  crop there (the volume then sits in the middle of the crop; the original padded at the end, with 0 HU);
- ``crop_start`` indexes the padded volume; volume voxel ``v`` lands at crop index ``v + pad_before - crop_start``;
- ``crop_center`` is the lesion centre (volume coordinates) the crop was planned around;
- ``flipped`` lists the crop axes that were mirrored after cropping.

No padded copy of the volume is ever made: only the part of the volume inside the crop is copied.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np
from ldm.data.components import ranked_components
from ldm.errors import DataError


@dataclass(frozen=True)
class CropWindow:
    """Where a crop sits in its volume (voxels, ``(z, y, x)`` order)."""

    crop_start: tuple[int, int, int]
    crop_size: tuple[int, int, int]
    full_size: tuple[int, int, int]
    pad_before: tuple[int, int, int]
    crop_center: tuple[int, int, int]
    flipped: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, list[int]]:
        """Plain lists of ints (the ``crop`` entry of a dataset item)."""
        return {key: [int(v) for v in value] for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, info: dict) -> "CropWindow":
        """Inverse of :meth:`as_dict` (accepts tensors or lists as values)."""
        return cls(**{key: tuple(int(v) for v in info[key]) for key in cls.__dataclass_fields__ if key in info})

    def volume_slices(self) -> tuple[slice, ...]:
        """Slices of the volume covered by the crop (the padding excluded)."""
        return tuple(
            slice(max(start - pad, 0), min(start - pad + size, full))
            for start, pad, size, full in zip(self.crop_start, self.pad_before, self.crop_size, self.full_size)
        )

    def crop_slices(self) -> tuple[slice, ...]:
        """Slices of the (unflipped) crop that hold volume voxels; pairs with :meth:`volume_slices`."""
        return tuple(
            slice(source.start + pad - start, source.stop + pad - start)
            for source, start, pad in zip(self.volume_slices(), self.crop_start, self.pad_before)
        )


def mask_bbox(mask: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the foreground of ``mask`` as slices (``stop`` exclusive); DataError when empty.

    Uses per-axis projections, which is much faster than listing the voxels of a large volume.
    """
    mask = np.asarray(mask, dtype=bool)
    slices = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if present.size == 0:
            raise DataError("the mask holds no foreground voxel")
        slices.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(slices)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest face-connected component of ``mask`` (the first one in scan order on ties)."""
    mask = np.asarray(mask, dtype=bool)
    box = mask_bbox(mask)
    components, ranked, _ = ranked_components(mask[box])
    largest = np.zeros(mask.shape, dtype=bool)
    largest[box] = components == ranked[0]
    return largest


def bbox_center(mask: np.ndarray) -> tuple[int, int, int]:
    """Centre ``(min + max) // 2`` per axis of the bounding box of ``mask`` (voxel indices)."""
    return tuple((box.start + box.stop - 1) // 2 for box in mask_bbox(mask))


def plan_crop(full_size: Sequence[int], crop_size: Sequence[int], center: Sequence[int],
              offset: Sequence[int] = (0, 0, 0)) -> CropWindow:
    """A crop of ``crop_size`` centred on ``center + offset``, shifted to lie inside the (padded) volume.

    Along an axis shorter than the crop, the volume is padded on both sides (``pad_before = missing // 2``) and
    the crop covers it entirely.
    """
    full_size, crop_size = tuple(int(s) for s in full_size), tuple(int(s) for s in crop_size)
    if len(full_size) != 3 or len(crop_size) != 3 or min(crop_size) < 1:
        raise DataError(f"crop of size {list(crop_size)} cannot be taken from a volume of size {list(full_size)}")
    starts, pads = [], []
    for size, crop, middle, shift in zip(full_size, crop_size, center, offset):
        pad = max(crop - size, 0) // 2
        padded = max(size, crop)
        starts.append(min(max(int(middle) + pad + int(shift) - crop // 2, 0), padded - crop))
        pads.append(pad)
    return CropWindow(tuple(starts), crop_size, full_size, tuple(pads), tuple(int(c) for c in center))


def take_crop(array: np.ndarray, window: CropWindow, fill: float = 0) -> np.ndarray:
    """The crop of ``array`` (last three axes ``(z, y, x)``); voxels outside the volume are ``fill``."""
    if tuple(array.shape[-3:]) != window.full_size:
        raise DataError(
            f"array of shape {tuple(array.shape[-3:])} does not match the crop's volume {list(window.full_size)}"
        )
    crop = np.full(array.shape[:-3] + window.crop_size, fill, dtype=array.dtype)
    crop[(...,) + window.crop_slices()] = array[(...,) + window.volume_slices()]
    for axis in window.flipped:
        crop = np.flip(crop, axis=axis - 3)
    return np.ascontiguousarray(crop)


def paste_crop(volume: np.ndarray, crop: np.ndarray, window: CropWindow) -> np.ndarray:
    """Write ``crop`` back into a copy of ``volume`` where it was taken (flips undone, padding dropped); returns it."""
    if tuple(volume.shape[-3:]) != window.full_size or tuple(crop.shape[-3:]) != window.crop_size:
        raise DataError(
            f"cannot paste a crop of shape {tuple(crop.shape[-3:])} into a volume of shape {tuple(volume.shape[-3:])} "
            f"with a window for {list(window.crop_size)} in {list(window.full_size)}"
        )
    for axis in window.flipped:
        crop = np.flip(crop, axis=axis - 3)
    pasted = np.array(volume, copy=True)
    pasted[(...,) + window.volume_slices()] = crop[(...,) + window.crop_slices()]
    return pasted


def draw_offset(rng: np.random.Generator, jitter: Sequence[int]) -> tuple[int, int, int]:
    """A uniform integer offset in ``[-jitter, jitter]`` per axis."""
    return tuple(int(rng.integers(-j, j + 1)) if j > 0 else 0 for j in jitter)


def draw_flips(rng: np.random.Generator, axes: Sequence[int], probability: float = 0.5) -> tuple[int, ...]:
    """The subset of ``axes`` to mirror, each chosen independently with ``probability``."""
    return tuple(int(axis) for axis in axes if rng.random() < probability)


def with_flips(window: CropWindow, flipped: Sequence[int]) -> CropWindow:
    """``window`` recording that the crop axes ``flipped`` are mirrored."""
    return replace(window, flipped=tuple(sorted(int(axis) for axis in flipped)))
