"""Pieces both stages share: the per-case loop (progress bar, one failure never stops the others), crop checks,
and reading the CT grid a case's outputs are written on."""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.data.volume import Geometry, read_geometry
from ldm.errors import ConfigError, DataError
from inference.cases import CaseSpec
from inference.memory import release_memory
from inference.results import CaseResult

# Largest difference, in mm, between the affines of two files of one case that still counts as the same grid.
AFFINE_TOLERANCE_MM = 1e-3


def unet_factor(model: torch.nn.Module) -> int:
    """How many times the diffusion UNet halves each axis, as a size factor (``2 ** (levels - 1)``)."""
    return 2 ** (len(model.model.channel_mult) - 1)


def check_crop(crop_size: Sequence[int], factor: int, what: str) -> None:
    """ConfigError unless every axis of ``crop_size`` is a multiple of ``factor``."""
    if any(int(size) % factor for size in crop_size):
        raise ConfigError(f"inference.crop_size {list(crop_size)}: every axis must be a multiple of {factor} ({what})")


def case_grid(image_path: str, other_path: str, other_shape: Sequence[int]) -> Geometry:
    """Geometry of the CT at ``image_path``; DataError unless the array read from ``other_path`` lies on its grid."""
    geometry = read_geometry(image_path)
    if tuple(other_shape) != geometry.shape_zyx:
        raise DataError(f"{other_path}: shape {tuple(other_shape)} (z, y, x) differs from the CT {image_path} "
                        f"{geometry.shape_zyx}; both must lie on the CT's voxel grid")
    other = read_geometry(other_path)
    if np.abs(other.affine - geometry.affine).max() > AFFINE_TOLERANCE_MM:
        raise DataError(f"{other_path}: its affine differs from the CT {image_path}; both must lie on the CT's grid")
    return geometry


def process_cases(process: Callable[[CaseSpec], CaseResult], cases: Sequence[CaseSpec], description: str,
                  progress: bool = True, position: int = 0) -> list[CaseResult]:
    """Run ``process`` on every case in order, with a progress bar; returns the results (failures included).

    ``process`` records a case's own errors in its result (see :meth:`CaseResult.fail`)."""
    results = []
    with tqdm(total=len(cases), desc=description, unit="case", disable=not progress, position=position,
              leave=position == 0) as bar:
        for case in cases:
            start = time.perf_counter()
            result = process(case)
            if not result.ok:
                release_memory()  # a failed case (e.g. out of GPU memory) must not hold memory the next one needs
            result.seconds = round(time.perf_counter() - start, 3)
            results.append(result)
            bar.set_postfix_str(f"{case.case_id}: {result.status}")
            bar.update(1)
    return results
