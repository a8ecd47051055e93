"""Small nnU-Net v2 raw datasets whose lesions are known by construction, for the ``prepare_dataset`` tests.

Anatomy comes from the demo phantoms (:func:`demo.make_phantoms.render_case`, the healthy CT and its v1
segmentation); each case then gets one lesion drawn here (:mod:`ldm.data.synthetic_geometry`) in the liver, with
a known HU offset from the liver's median, shape and position. Its voxels are set to that HU plus Gaussian noise
(about the CT's own), so its mean HU is known to a few HU (and measured exactly) and its box exactly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from demo.make_phantoms import render_case
from ldm.data.organs import organ_id
from ldm.data.synthetic_geometry import Grid, distance_inside, geometry_for, random_blob
from ldm.data.volume import Geometry, read_label, read_volume, write_volume

LIVER = organ_id("liver")
SHAPE, SPACING = (40, 80, 80), 2.0
NOISE_HU = 10.0


@dataclass
class KnownLesion:
    """What was put into a case: in-memory mask, mean HU, file-axis box size, the organ's median HU."""

    case_id: str
    mask: np.ndarray
    mean_hu: float
    size_vox: tuple[int, int, int]
    organ_hu: float
    offset_hu: float
    irregular: bool
    position: str


def write_dataset_json(root: Path, cases: int, labels: dict[str, int] | None = None) -> None:
    content = {"channel_names": {"0": "CT"}, "labels": labels or {"background": 0, "liver": 1, "tumor": 2},
               "numTraining": cases, "file_ending": ".nii.gz", "name": root.name}
    (root / "dataset.json").write_text(json.dumps(content))


def file_box_size(geometry: Geometry, mask: np.ndarray) -> tuple[int, int, int]:
    """Bounding box of an in-memory mask along the file's axes (the report's ``size`` axes)."""
    box = ndimage.find_objects(geometry.to_file(mask).astype(np.int8))[0]
    return tuple(int(s.stop - s.start) for s in box)


def lesion_mask(organ: np.ndarray, grid: Grid, lobulated: bool, position: str) -> np.ndarray:
    """A lesion mask in ``organ``: an ellipsoid, or three overlapping balls in an L (lobulated, not convex).

    ``position``: ``"within"`` (deep in the organ, clipped to it) or ``"surface"`` (centred on the boundary)."""
    depth = distance_inside(organ, grid.spacing)
    if lobulated:
        radius = 0.3 * depth.max()
        parts = [(0.0, 0.0, 0.0), (0.0, 1.8 * radius, 0.0), (0.0, 0.0, 1.8 * radius)]
        semi_axes, reach = [radius] * 3, 2.8 * radius
    else:
        radius = 0.55 * depth.max() if position == "within" else 0.8 * depth.max()
        parts, semi_axes, reach = [(0.0, 0.0, 0.0)], [radius, 0.9 * radius, 0.8 * radius], radius
    if position == "within":
        candidates = np.argwhere(depth >= reach + max(grid.spacing))
    else:
        candidates = np.argwhere(organ & (depth <= max(grid.spacing)))
    centre_index = candidates[len(candidates) // 2]
    centre = np.array([float(axis.ravel()[i]) for axis, i in zip(grid.coordinates(), centre_index)])
    mask = np.zeros(grid.shape, dtype=bool)
    for part in parts:
        blob = random_blob(np.random.default_rng(0), centre + part, semi_axes, max_tilt_deg=0.0)
        mask |= blob.mask(grid)
    return mask & organ if position == "within" else mask


def make_case(root: Path, case_id: str, index: int, offset_hu: float, irregular: bool = False,
              position: str = "within", seg_dir: Path | None = None, halves_hu: float = 0.0,
              halo: bool = False) -> KnownLesion:
    """Write one case (image, 0/1/2 label, optional v1 segmentation) and return what it holds.

    ``halves_hu``: one half of the lesion's voxels (split along the first axis) ``+halves_hu``, as many others
    ``-halves_hu`` (heterogeneous, same mean); ``halo``: the lesion fades out over two voxel rings outside its mask (60 %, then
    30 % of the offset), an ill-defined margin."""
    geometry = geometry_for(SHAPE, (SPACING,) * 3, ("L", "P", "S"))
    rendered = render_case(0, index, geometry)
    ct = rendered["healthy"].astype(np.float64)
    seg = rendered["seg"].astype(np.int16)
    liver = seg == LIVER
    grid = Grid(geometry.shape_zyx, geometry.spacing_zyx)
    organ_hu = float(np.median(ct[liver]))
    mask = lesion_mask(liver, grid, irregular, position)
    rng = np.random.default_rng(index)
    ct[mask] = organ_hu + offset_hu + rng.normal(0.0, NOISE_HU, size=int(mask.sum()))
    if halves_hu:
        voxels = np.flatnonzero(mask)  # in scan order, so the halves are the two ends along the first axis
        half = len(voxels) // 2
        ct.flat[voxels[:half]] += halves_hu
        ct.flat[voxels[half: 2 * half]] -= halves_hu
    if halo:
        inner = ndimage.binary_dilation(mask) & liver & ~mask
        outer = ndimage.binary_dilation(mask, iterations=2) & liver & ~mask & ~inner
        ct[inner] += 0.6 * offset_hu
        ct[outer] += 0.3 * offset_hu
    label = np.where(mask, 2, np.where(liver, 1, 0))
    write_volume(root / "imagesTr" / f"{case_id}_0000.nii.gz", np.rint(ct).astype(np.int16), geometry, np.int16)
    write_volume(root / "labelsTr" / f"{case_id}.nii.gz", label.astype(np.uint8), geometry, np.uint8)
    if seg_dir is not None:
        write_volume(seg_dir / f"{case_id}.nii.gz", seg.astype(np.uint8), geometry, np.uint8)
    return KnownLesion(case_id, mask, float(np.rint(ct)[mask].mean()), file_box_size(geometry, mask), organ_hu,
                       offset_hu, irregular, position)


def make_example_ct_case(root: Path, case_id: str, ct_path: Path, seg_path: Path, offset_hu: float,
                         semi_axes_mm=(15.0, 12.0, 10.0), seed: int = 0) -> KnownLesion:
    """A case of a real CT (``ct_path``, HU) with an ellipsoid lesion inserted deep in its liver (found in the
    TotalSegmentator v2 segmentation ``seg_path``, liver = 5 in v1 and v2): the lesion's voxels are set to the
    liver's median HU plus ``offset_hu`` plus noise of ``NOISE_HU``. The label holds 1 for the lesion only (the
    organ then comes from the segmentation). Written on the CT's own grid and orientation."""
    ct, geometry = read_volume(ct_path)
    seg, _ = read_label(seg_path)
    liver = seg == LIVER
    grid = Grid(geometry.shape_zyx, geometry.spacing_zyx)
    depth = distance_inside(liver, grid.spacing)
    deepest = np.unravel_index(int(np.argmax(depth)), depth.shape)
    centre = [float(axis.ravel()[i]) for axis, i in zip(grid.coordinates(), deepest)]
    mask = random_blob(np.random.default_rng(seed), centre, semi_axes_mm, max_tilt_deg=0.0).mask(grid) & liver
    organ_hu = float(np.median(ct[liver]))
    lesioned = ct.astype(np.float64)
    lesioned[mask] = organ_hu + offset_hu + np.random.default_rng(seed).normal(0.0, NOISE_HU, int(mask.sum()))
    lesioned = np.rint(lesioned)
    write_volume(root / "imagesTr" / f"{case_id}_0000.nii.gz", lesioned.astype(np.int16), geometry, np.int16)
    write_volume(root / "labelsTr" / f"{case_id}.nii.gz", mask.astype(np.uint8), geometry, np.uint8)
    return KnownLesion(case_id, mask, float(lesioned[mask].mean()), file_box_size(geometry, mask), organ_hu,
                       offset_hu, False, "within")
