"""Checks of every case before any model runs: its files are there (for LINet also the CT ``preprocess.py``
recorded, whose grid the result goes on), each lesion box fits the crops, each box overlaps its organ. A case with
a problem fails at once, naming each problem; the others go on.

Why up front: a lesion box larger than a crop (with the blend rim around it) used to fail only after LMNet had
sampled it. The same bound feeds ``preprocess.py`` (:func:`capacity_xyz`), so the reports never ask for a lesion
the crops cannot hold: per axis, the LMNet crop, and the LINet crop minus the rim on both sides.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ldm.data.attributes import organ_mask, select_organ_key
from ldm.data.cases import load_case
from ldm.data.organs import organ_name
from ldm.errors import LesionDiffusionError
from inference.cases import LMNET_HINT, CaseSpec, recorded_source
from inference.common import case_grid
from inference.options import DEFAULT_CROPS, InferenceOptions
from inference.paste import DEFAULT_RIM_MM, rim_voxels
from inference.plan import fit_problem, select_components
from inference.results import CaseResult

INPUT_KINDS = {"lmnet": ("image", "boxes", "type", "seg"), "linet": ("image", "label", "type")}
MISSING = {"image": "CT not found", "boxes": "box file not found", "type": "report file not found",
           "seg": "segmentation not found", "label": f"lesion mask not found; {LMNET_HINT}"}


def capacity_zyx(lmnet_crop: Sequence[int], linet_crop: Sequence[int], rim_mm: float,
                 spacing_zyx: Sequence[float]) -> tuple[int, int, int]:
    """The largest lesion box (voxels, ``(z, y, x)``) both stages can hold at ``spacing_zyx`` mm."""
    rim = rim_voxels(rim_mm, spacing_zyx)
    return tuple(max(min(int(a), int(b) - 2 * r), 1) for a, b, r in zip(lmnet_crop, linet_crop, rim))


def capacity_xyz(spacing_xyz: Sequence[float], lmnet_crop: Sequence[int] = DEFAULT_CROPS["lmnet"],
                 linet_crop: Sequence[int] = DEFAULT_CROPS["linet"],
                 rim_mm: float = DEFAULT_RIM_MM) -> tuple[int, int, int]:
    """:func:`capacity_zyx` along the standardised file axes ``(X, Y, Z)`` (the axes of a report's ``size``)."""
    return capacity_zyx(lmnet_crop, linet_crop, rim_mm, tuple(spacing_xyz)[::-1])[::-1]


def thin_problem(extent: Sequence[int], shape: Sequence[int], rim: Sequence[int], what: str) -> list[str]:
    """The axes along which a volume of ``shape`` cannot hold a lesion of ``extent`` voxels with ``rim`` voxels of
    blend rim on both sides (a volume smaller than a crop is fine: crops are padded, but the rim must lie inside)."""
    thin = [f"{'zyx'[axis]}: {extent[axis]} + 2 x {rim[axis]} rim voxels > {shape[axis]}" for axis in range(3)
            if extent[axis] + 2 * rim[axis] > shape[axis]]
    if not thin:
        return []
    return [f"the CT is too thin for {what} with its blend rim ({'; '.join(thin)}): give a CT with more slices "
            "along that axis, or a smaller lesion"]


def case_problems(case: CaseSpec, options: InferenceOptions,
                  other_crops: Sequence[tuple[Sequence[int], float]] = ()) -> list[str]:
    """Every problem of one case for ``options.stage`` (empty when it can run). ``other_crops``: further
    ``(crop_size, rim_mm)`` the boxes must fit, e.g. the LINet crop when checking before LMNet."""
    missing = [f"{case.paths.get(kind)}: {MISSING[kind]}" for kind in INPUT_KINDS[options.stage]
               if not case.paths.get(kind) or not Path(case.paths[kind]).is_file()]
    if missing:
        return missing
    lesion_kind = "boxes" if options.stage == "lmnet" else "label"
    paths = {"image": case.paths["image"], "label": case.paths[lesion_kind], "type": case.paths["type"]}
    if case.paths.get("seg"):
        paths["seg"] = case.paths["seg"]
    try:
        if options.stage == "linet":
            recorded_source(paths["image"])  # the result goes on that CT's grid: it must still be there
        loaded = load_case(paths, need_image=False, seg_version=options.seg_version)
        geometry = case_grid(paths["image"], paths["label"], loaded.label.shape)
        masks = select_components(loaded.label, options.max_mask_num, options.min_component_voxels)
    except LesionDiffusionError as error:
        return [str(error)]
    own_rim = options.rim_mm if options.stage == "linet" else 0.0
    crops = [(options.crop_size, own_rim), *other_crops]
    problems = []
    what = "box" if options.stage == "lmnet" else "lesion"
    rim = rim_voxels(max(rim_mm for _, rim_mm in crops), geometry.spacing_zyx)
    for rank, mask in enumerate(masks):
        extent = [int(np.any(mask, axis=tuple(a for a in range(3) if a != axis)).sum()) for axis in range(3)]
        problems.extend(thin_problem(extent, mask.shape, rim, f"{what} {rank}"))
        for crop, rim_mm in crops:
            problem = fit_problem(extent, crop, rim_voxels(rim_mm, geometry.spacing_zyx), f"{what} {rank}")
            if problem:
                problems.append(problem)
        if options.stage == "lmnet" and loaded.seg is not None:
            key = select_organ_key(loaded.report, mask, loaded.seg)
            if not (organ_mask(loaded.seg, loaded.report, key) & mask).any():
                problems.append(f"box {rank} does not overlap the {organ_name(key)} (v1 id {key}) of the "
                                f"segmentation {paths['seg']}: no room for a lesion of that organ there")
    return problems


def preflight(cases: Sequence[CaseSpec], options: InferenceOptions,
              other_crops: Sequence[tuple[Sequence[int], float]] = ()) -> tuple[list[CaseSpec], list[CaseResult]]:
    """Split ``cases`` into those that can run and failed results (every problem named) for the others."""
    ready, refused = [], []
    for case in cases:
        problems = case_problems(case, options, other_crops)
        if problems:
            result = CaseResult(case.index, case.case_id)
            result.error = f"preflight: {'; '.join(problems)}"
            refused.append(result)
        else:
            ready.append(case)
    return ready, refused
