"""What the scan says about one lesion: size, HU, contrast with its organ, spread, shape, margin and position.

Arrays may be in any axis order (a file's voxel order, or the canonical in-memory ``(z, y, x)``) as long as all
share it; ``spacing`` is the voxel size in mm along those axes, HU are Hounsfield units. Every measure below is
invariant to flipping and permuting axes except ``size_vox``/``box_start_vox``, which follow the array's axes
unless ``file_axes`` says which array axis holds each file axis. Thresholds: :mod:`ldm.lesion.thresholds`.

- ``size_vox``: the lesion's bounding box, ``stop - start`` voxels per (file) axis;
- ``volume_mm3``: voxels x the voxel volume ``|det(affine)|`` (:func:`ldm.data.components.voxel_volume_mm3`;
  the product of ``spacing`` when no voxel volume is given, the same on any orthogonal grid);
- ``mean_hu``/``std_hu``: over every lesion voxel; ``interior_mean_hu``/``interior_std_hu``: over the lesion
  eroded by one voxel (the rim mixes with the organ by partial volume), the whole lesion when that leaves fewer
  than ``min_voxels`` voxels. The report's ``CT value``, the density and the gate's HU check use the interior
  mean, as a reader's region of interest would;
- ``organ_reference_hu``: median HU of the organ within ``shell_mm`` of the lesion, every lesion excluded (the
  whole organ outside the lesions when that shell has fewer than ``min_voxels`` voxels); ``organ_noise_hu``: a robust standard deviation (1.4826 x median absolute deviation) of the same voxels,
  so vessels do not count as noise; ``contrast_hu = interior_mean_hu - organ_reference_hu``;
- ``below_fraction``/``above_fraction``: interior voxels below ``reference - iso_band_hu`` / above
  ``reference + iso_band_hu``; ``low_tail``/``high_tail``: interior voxels further than ``tail_stds`` noise
  standard deviations (at least 1 HU) below / above the lesion's own mean;
- ``solidity``: lesion voxels / voxels whose centre lies in the convex hull of the lesion's voxel centres (1 for
  a convex lesion at any size, lower when lobulated); ``elongation``: square root of the largest over the
  smallest eigenvalue of the covariance of voxel positions in mm (1 for a ball);
- ``margin_leak``: ``(mean HU of the one-voxel outer rim in the organ - reference) / (interior mean -
  reference)``: about 0 for a sharp margin, a large part of the contrast when the lesion fades into the organ
  (None when the contrast is within the iso band: an isodense lesion has no margin to see);
  ``margin_gradient_hu_per_mm``: mean gradient magnitude (central differences in mm) on the one-voxel rims
  inside and outside the boundary;
- ``shell_in_organ``: fraction of the lesion's outer face-neighbour shell inside the organ or another lesion
  (:func:`ldm.data.attributes.shell_fraction_in_organ`); ``inside_organ_fraction``: lesion voxels inside ``organ``
  as given (hollow organs dilated by one voxel, their wall is often outside the segmented lumen);
  ``lumen_fraction``: lesion voxels farther than ``lumen_mm`` inside the organ with its lesions;
- ``nearest_other_organ_mm``: distance to the closest voxel of another segmented structure (None beyond
  ``adjacent_search_mm``); ``aorta_hu``: mean HU of the aorta of the segmentation (None when too small).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from ldm.data.attributes import shell_fraction_in_organ
from ldm.data.components import FACE_CONNECTIVITY
from ldm.data.crops import mask_bbox
from ldm.data.organs import is_hollow
from ldm.data.synthetic_geometry import distance_inside
from ldm.errors import DataError
from ldm.lesion.thresholds import AORTA_V1_ID, DEFAULT, Thresholds

MAD_TO_STD = 1.4826
HULL_CHUNK = 20_000_000
SOLIDITY_MAX_VOXELS = 1_000_000
CUBE = np.ones((3, 3, 3), dtype=bool)


@dataclass
class LesionMeasurement:
    """Measurements of one lesion (module docstring for the definitions; HU, mm, mm3, voxels)."""

    voxels: int
    volume_mm3: float
    box_start_vox: tuple[int, int, int]
    size_vox: tuple[int, int, int]
    equivalent_diameter_mm: float
    mean_hu: float
    std_hu: float
    interior_mean_hu: float
    interior_std_hu: float
    organ_reference_hu: float
    organ_noise_hu: float
    contrast_hu: float
    below_fraction: float
    above_fraction: float
    low_tail: float
    high_tail: float
    solidity: float | None
    elongation: float
    margin_leak: float | None
    margin_gradient_hu_per_mm: float
    shell_in_organ: float
    inside_organ_fraction: float
    lumen_fraction: float
    nearest_other_organ_mm: float | None
    aorta_hu: float | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly values, rounded to what the numbers mean."""
        return {key: round(value, 3) if isinstance(value, float) else value for key, value in asdict(self).items()}


def grown(box: Sequence[slice], margins: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    """``box`` widened by ``margins`` voxels per axis, clipped to ``shape``."""
    return tuple(slice(max(s.start - m, 0), min(s.stop + m, n)) for s, m, n in zip(box, margins, shape))


def _centres_in_hull(equations: np.ndarray, shape: Sequence[int]) -> int:
    """Number of voxel centres of a ``shape`` grid inside the convex hull given by qhull's facet ``equations``
    (``normal . p + offset <= 0`` inside), counted exactly column by column along the last axis."""
    columns = np.indices(shape[:2]).reshape(2, -1).T.astype(np.float64)
    normal_k, tol = equations[:, 2], 1e-9
    upper_facets, lower_facets = normal_k > tol, normal_k < -tol
    flat = ~(upper_facets | lower_facets)
    inside = 0
    for chunk in np.array_split(columns, max(1, len(columns) * len(equations) // HULL_CHUNK)):
        rest = -(chunk @ equations[:, :2].T + equations[:, 3])  # normal_k * k <= rest for every facet
        upper = np.min(rest[:, upper_facets] / normal_k[upper_facets], axis=1, initial=shape[2] - 1)
        lower = np.max(rest[:, lower_facets] / normal_k[lower_facets], axis=1, initial=0)
        allowed = np.all(rest[:, flat] >= -tol, axis=1)
        counts = np.floor(np.minimum(upper, shape[2] - 1) + tol) - np.ceil(np.maximum(lower, 0) - tol) + 1
        inside += int(np.sum(np.where(allowed, np.maximum(counts, 0), 0)))
    return inside


def solidity(lesion: np.ndarray) -> float | None:
    """Lesion voxels / voxels whose centre lies in the convex hull of the lesion's voxel centres (1 for a
    digitally convex lesion, whatever its size; lower when lobulated); None for a flat or tiny lesion. A lesion
    whose box exceeds :data:`SOLIDITY_MAX_VOXELS` is measured on every n-th voxel (a ratio, it hardly changes)."""
    local = lesion[mask_bbox(lesion)]
    stride = max(1, int(math.ceil((local.size / SOLIDITY_MAX_VOXELS) ** (1.0 / 3.0))))
    local = local[::stride, ::stride, ::stride]
    surface = local & ~ndimage.binary_erosion(local, FACE_CONNECTIVITY)
    try:
        hull = ConvexHull(np.argwhere(surface).astype(np.float64))
    except (QhullError, ValueError):
        return None
    return float(local.sum() / max(_centres_in_hull(hull.equations, local.shape), 1))


def elongation(lesion: np.ndarray, spacing: Sequence[float]) -> float:
    """sqrt(largest / smallest eigenvalue) of the covariance of voxel positions in mm (a voxel's own extent
    included, so a one-voxel-thin lesion stays finite)."""
    positions = np.argwhere(lesion) * np.asarray(spacing)
    covariance = np.cov(positions.T, bias=True) if len(positions) > 1 else np.zeros((3, 3))
    covariance = covariance + np.diag(np.asarray(spacing, dtype=np.float64) ** 2 / 12.0)
    eigenvalues = np.linalg.eigvalsh(covariance)
    return float(math.sqrt(eigenvalues[-1] / eigenvalues[0]))


def margin_gradient(image: np.ndarray, lesion: np.ndarray, spacing: Sequence[float]) -> float:
    """Mean gradient magnitude (HU/mm) of ``image`` on the inner and outer one-voxel rims of ``lesion``."""
    gradients = np.gradient(image.astype(np.float64), *spacing)
    magnitude = np.sqrt(sum(g ** 2 for g in gradients))
    rim = (ndimage.binary_dilation(lesion, FACE_CONNECTIVITY) & ~lesion) | (
        lesion & ~ndimage.binary_erosion(lesion, FACE_CONNECTIVITY))
    return float(magnitude[rim].mean())


def interior_values(values: np.ndarray, lesion: np.ndarray, min_voxels: int = DEFAULT.min_voxels) -> np.ndarray:
    """The values of ``values`` in ``lesion`` eroded by one voxel (all lesion voxels when that leaves fewer than
    ``min_voxels``): the lesion without its partial-volume rim."""
    interior = ndimage.binary_erosion(lesion, FACE_CONNECTIVITY)
    return values[interior] if interior.sum() >= min_voxels else values[lesion]


def _robust_std(values: np.ndarray) -> float:
    return float(MAD_TO_STD * np.median(np.abs(values - np.median(values))))


def _organ_reference(ct: np.ndarray, organ: np.ndarray, lesions: np.ndarray, window: tuple[slice, ...],
                     lesion: np.ndarray, spacing: Sequence[float], thresholds: Thresholds) -> np.ndarray:
    """HU of the organ voxels the lesion is compared with (module docstring)."""
    distance = ndimage.distance_transform_edt(~lesion, sampling=spacing)
    shell = (distance > 0) & (distance <= thresholds.shell_mm) & organ[window] & ~lesions[window]
    if shell.sum() >= thresholds.min_voxels:
        return ct[window][shell].astype(np.float64)
    rest = organ & ~lesions
    if not rest.any():
        raise DataError("the organ has no voxel outside the lesions to compare the lesion's HU with")
    return ct[rest].astype(np.float64)


def _margin_leak(ct_window: np.ndarray, lesion: np.ndarray, organ: np.ndarray, interior_mean: float,
                 reference: float, thresholds: Thresholds) -> float | None:
    outer = ndimage.binary_dilation(lesion, FACE_CONNECTIVITY) & ~lesion & organ
    if outer.sum() < thresholds.min_voxels or abs(interior_mean - reference) <= thresholds.iso_band_hu:
        return None
    return float((ct_window[outer].mean() - reference) / (interior_mean - reference))


def nearest_other_organ_mm(lesion: np.ndarray, others: np.ndarray, spacing: Sequence[float],
                           search_mm: float = DEFAULT.adjacent_search_mm) -> float | None:
    """Distance in mm (centre to centre) from the lesion to the nearest voxel of ``others``; None when farther
    than ``search_mm`` (the search is limited to a window around the lesion)."""
    reach = [int(math.ceil(search_mm / s)) + 1 for s in spacing]
    window = grown(mask_bbox(lesion), reach, lesion.shape)
    if not others[window].any():
        return None
    distance = ndimage.distance_transform_edt(~others[window], sampling=spacing)
    nearest = float(distance[lesion[window]].min())
    return nearest if nearest <= search_mm else None


def aorta_hu(ct: np.ndarray, segmentation: np.ndarray, min_voxels: int = DEFAULT.min_aorta_voxels) -> float | None:
    """Mean HU of the aorta (TotalSegmentator v1 id 7); None when it has fewer than ``min_voxels`` voxels."""
    aorta = segmentation == AORTA_V1_ID
    return float(ct[aorta].mean()) if np.count_nonzero(aorta) >= min_voxels else None


def measure_lesion(ct: np.ndarray, lesion: np.ndarray, lesions: np.ndarray, organ: np.ndarray,
                   segmentation: np.ndarray, organ_id: int, spacing: Sequence[float],
                   thresholds: Thresholds = DEFAULT, voxel_mm3: float | None = None, file_axes: Sequence[int] | None = None) -> LesionMeasurement:
    """Measure ``lesion`` (one component of ``lesions``) against ``organ`` on ``ct`` (module docstring).

    ``segmentation``: v1 organ ids on the same grid (other structures and the aorta are read from it);
    ``organ``: the organ's voxels (lesions may be included or not); ``file_axes[a]``: the array axis holding file
    axis ``a`` (for ``size_vox``/``box_start_vox``; default: the array's own axes)."""
    spacing = tuple(float(s) for s in spacing)
    box = mask_bbox(lesion)
    margins = [int(math.ceil(thresholds.shell_mm / s)) + 2 for s in spacing]
    window = grown(box, margins, lesion.shape)
    local, ct_window = lesion[window], ct[window].astype(np.float64)
    values = ct_window[local]
    inner = interior_values(ct_window, local, thresholds.min_voxels)
    surrounding = _organ_reference(ct, organ, lesions, window, local, spacing, thresholds)
    reference, noise = float(np.median(surrounding)), _robust_std(surrounding)
    interior_mean = float(inner.mean())
    tail = thresholds.tail_stds * max(noise, 1.0)
    with_lesions = organ | lesions
    lumen_window = grown(box, [int(math.ceil(thresholds.lumen_mm / s)) + 1 for s in spacing], lesion.shape)
    lumen = distance_inside(with_lesions[lumen_window], spacing) > thresholds.lumen_mm
    inside = organ[window]
    if is_hollow(int(organ_id)):
        inside = ndimage.binary_dilation(inside, CUBE)
    others = (segmentation != 0) & (segmentation != organ_id) & ~with_lesions
    voxel_mm3 = float(np.prod(spacing)) if voxel_mm3 is None else float(voxel_mm3)
    voxels = int(local.sum())
    axes = tuple(range(3)) if file_axes is None else tuple(int(a) for a in file_axes)
    return LesionMeasurement(
        voxels=voxels, volume_mm3=voxels * voxel_mm3,
        box_start_vox=tuple(int(box[a].start) for a in axes), size_vox=tuple(int(box[a].stop - box[a].start)
                                                                             for a in axes),
        equivalent_diameter_mm=float((6.0 * voxels * voxel_mm3 / math.pi) ** (1.0 / 3.0)),
        mean_hu=float(values.mean()), std_hu=float(values.std()), interior_mean_hu=interior_mean,
        interior_std_hu=float(inner.std()), organ_reference_hu=reference, organ_noise_hu=noise,
        contrast_hu=interior_mean - reference,
        below_fraction=float(np.mean(inner < reference - thresholds.iso_band_hu)),
        above_fraction=float(np.mean(inner > reference + thresholds.iso_band_hu)),
        low_tail=float(np.mean(inner < interior_mean - tail)),
        high_tail=float(np.mean(inner > interior_mean + tail)),
        solidity=solidity(local), elongation=elongation(local, spacing),
        margin_leak=_margin_leak(ct_window, local, organ[window], interior_mean, reference, thresholds),
        margin_gradient_hu_per_mm=margin_gradient(ct_window, local, spacing),
        shell_in_organ=shell_fraction_in_organ(lesion, with_lesions),
        inside_organ_fraction=float((local & inside).sum()) / voxels,
        lumen_fraction=float(lumen[lesion[lumen_window]].mean()),
        nearest_other_organ_mm=nearest_other_organ_mm(lesion, others, spacing, thresholds.adjacent_search_mm),
        aorta_hu=aorta_hu(ct, segmentation, thresholds.min_aorta_voxels),
    )
