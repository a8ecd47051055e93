"""Measurements of every lesion of one inpainted CT (no pass/fail here: see :mod:`quality.gate`).

Per lesion (a face-connected component of value 2 of the output's mask, largest first): size, organ overlap, HU,
density contrast against the organ, margin sharpness, components per box, and the changes outside the paste
region. What each one is, in which unit and CSV column, is written once, in ``docs/quality.md`` ("How the
measurements are made").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from ldm.data.attributes import organ_mask, report_attributes, read_report, select_organ_key, short_ct_value
from ldm.data.crops import FACE_CONNECTIVITY
from ldm.data.organs import is_hollow, organ_name, to_v1
from ldm.data.volume import CANONICAL_AXCODES, Geometry, read_geometry, read_label, read_volume
from ldm.errors import DataError
from inference.paste import lesion_region, rim_voxels, working_dtype
from preprocessing.report_format import parse_size
from quality.density import measured_density, requested_density
from quality.outputs import OutputSpec
from quality.tolerances import Tolerances

LESION_VALUE = 2
MIN_SHELL_VOXELS = 10
GRID_ATOL_MM = 1e-3
CUBE = np.ones((3, 3, 3), dtype=bool)


@dataclass
class LesionQuality:
    """Measurements and verdict of one lesion; ``None`` where a value cannot be measured or was not requested.

    Sizes along the file's axes (``*_vox`` triples), HU in HU, lengths in mm, volumes in mm3. ``checks`` maps a
    check name to True (pass), False (fail) or None (n/a); ``passed`` is True when no check failed."""

    case: str
    output: str
    mask: str
    lesion: int
    organ: str
    organ_id: int
    voxels: int
    volume_mm3: float
    extent_vox: tuple[int, int, int]
    mean_hu: float
    std_hu: float
    margin_gradient_hu_per_mm: float
    components: int
    changed_outside_voxels: int
    changed_outside_max_abs_hu: float
    requested_size_vox: tuple[int, int, int] | None = None
    requested_volume_mm3: float | None = None
    volume_ratio: float | None = None
    extent_ratio_min: float | None = None
    extent_ratio_max: float | None = None
    inside_organ_fraction: float | None = None
    requested_hu: float | None = None
    hu_error: float | None = None
    organ_reference_hu: float | None = None
    contrast_hu: float | None = None
    density_measured: str | None = None
    density_requested: str | None = None
    box: int | None = None
    checks: dict[str, bool | None] = field(default_factory=dict)
    passed: bool = False

    @property
    def failed_checks(self) -> list[str]:
        """Names of the checks that failed, in check order."""
        return [name for name, verdict in self.checks.items() if verdict is False]


def _same_grid(reference: Geometry, other: Geometry, path: Path) -> None:
    if reference.shape_zyx != other.shape_zyx or not np.allclose(reference.affine, other.affine, atol=GRID_ATOL_MM):
        raise DataError(f"{path}: its voxel grid (shape {other.shape}) differs from the input CT's "
                        f"({reference.source}, shape {reference.shape}); every volume of a case must share one grid")


def memory_axis_of_file_axes(geometry: Geometry) -> tuple[int, int, int]:
    """For each file axis ``(i, j, k)``, the in-memory ``(z, y, x)`` axis holding it."""
    to_canonical = ornt_transform(io_orientation(geometry.affine), axcodes2ornt(CANONICAL_AXCODES))
    return tuple(2 - int(canonical) for canonical, _ in to_canonical)


def voxel_volume_mm3(geometry: Geometry) -> float:
    """Volume of one voxel in mm3 (oblique grids included)."""
    return float(abs(np.linalg.det(geometry.affine[:3, :3])))


def _grown(box: tuple[slice, ...], margins, shape) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - m, 0), min(s.stop + m, n)) for s, m, n in zip(box, margins, shape))


def paste_region(lesions: np.ndarray, rim_mm: float, spacing) -> np.ndarray:
    """Boolean map of every voxel a paste around ``lesions`` may change (:func:`inference.paste.lesion_region`
    with ``spacing`` mm per axis, computed on a window around the lesions only)."""
    region = np.zeros(lesions.shape, dtype=bool)
    if lesions.any():
        margins = [m + 1 for m in rim_voxels(rim_mm, spacing)]
        window = _grown(ndimage.find_objects(lesions.astype(np.int8))[0], margins, lesions.shape)
        region[window] = lesion_region(lesions[window], rim_mm, spacing)
    return region


def changed_outside(ct: np.ndarray, inpainted: np.ndarray, lesions: np.ndarray, rim_mm: float,
                    spacing) -> tuple[int, float]:
    """``(voxels, max |difference| in HU)`` of the inpainted CT that differ from the input outside the region a
    paste around ``lesions`` may change (``spacing``: mm per axis)."""
    changed = (inpainted != ct) & ~paste_region(lesions, rim_mm, spacing)
    if not changed.any():
        return 0, 0.0
    difference = np.abs(inpainted[changed].astype(np.float64) - ct[changed].astype(np.float64))
    return int(changed.sum()), float(difference.max())


def box_assignment(components: np.ndarray, count: int, boxes: np.ndarray | None) -> np.ndarray:
    """``box[c]`` for component ``c`` (1-based; entry 0 unused): the id of the box of ``bbox.nii.gz`` it overlaps
    most (1-based, largest box first), 0 when it overlaps none or there are no boxes."""
    assigned = np.zeros(count + 1, dtype=np.int64)
    if boxes is None or count == 0:
        return assigned
    box_labels, box_count = ndimage.label(boxes == LESION_VALUE, structure=FACE_CONNECTIVITY)
    if box_count == 0:
        return assigned
    inside = components > 0
    pairs = np.bincount(components[inside].astype(np.int64) * (box_count + 1) + box_labels[inside],
                        minlength=(count + 1) * (box_count + 1)).reshape(count + 1, box_count + 1)
    overlaps = pairs[1:, 1:]
    assigned[1:] = np.where(overlaps.max(axis=1) > 0, overlaps.argmax(axis=1) + 1, 0)
    return assigned


def margin_gradient(image: np.ndarray, lesion: np.ndarray, spacing_zyx) -> float:
    """Mean gradient magnitude (HU/mm) of ``image`` on the inner and outer one-voxel rims of ``lesion``."""
    gradients = np.gradient(image.astype(np.float64), *spacing_zyx)
    magnitude = np.sqrt(sum(g ** 2 for g in gradients))
    rim = (ndimage.binary_dilation(lesion, FACE_CONNECTIVITY) & ~lesion) | (
        lesion & ~ndimage.binary_erosion(lesion, FACE_CONNECTIVITY))
    return float(magnitude[rim].mean())


def requested_size(report: dict, key: str, attributes: dict[str, Any], source: Path) -> tuple[int, int, int] | None:
    """The report's lesion size (voxels along the file's axes): ``size``, else element ``[3][1]``, else None."""
    if attributes.get("size"):
        return parse_size(attributes["size"], what=f"{source}: size")
    entry = report[key]
    if len(entry) > 3 and isinstance(entry[3], list) and len(entry[3]) > 1:
        return parse_size(entry[3][1], what=f"{source}: element [3][1]")
    return None


def reference_hu(ct: np.ndarray, window: tuple[slice, ...], shell: np.ndarray, organ: np.ndarray,
                 lesions: np.ndarray) -> float | None:
    """Median HU of ``ct`` in the ``shell`` (window-shaped), or over the whole ``organ`` outside every lesion
    when the shell has fewer than :data:`MIN_SHELL_VOXELS` voxels; None when the organ is empty."""
    if shell.sum() >= MIN_SHELL_VOXELS:
        return float(np.median(ct[window][shell]))
    rest = organ & ~lesions
    return float(np.median(ct[rest])) if rest.any() else None


class OutputVolumes:
    """The volumes of one output on one grid: input CT, inpainted CT, mask, v1 segmentation and boxes."""

    def __init__(self, spec: OutputSpec, seg_version: str = "v1"):
        geometry = read_geometry(spec.image)
        dtype = working_dtype(geometry)
        self.ct, self.geometry = read_volume(spec.image, dtype=dtype)
        self.inpainted, inpainted_geometry = read_volume(spec.inpainted, dtype=dtype)
        _same_grid(self.geometry, inpainted_geometry, spec.inpainted)
        self.mask, mask_geometry = read_label(spec.mask)
        _same_grid(self.geometry, mask_geometry, spec.mask)
        self.seg = self.boxes = None
        if spec.seg is not None:
            seg, seg_geometry = read_label(spec.seg)
            _same_grid(self.geometry, seg_geometry, spec.seg)
            self.seg = to_v1(seg, seg_version)
        if spec.boxes is not None and spec.boxes.is_file():
            self.boxes, box_geometry = read_label(spec.boxes)
            _same_grid(self.geometry, box_geometry, spec.boxes)


def ranked_components(lesions: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Face-connected components of a boolean lesion map: ``(component ids array, ids largest first)``; lesion
    ``r`` of an output is component ``ids[r]`` (ties in scan order, as LINet ranks them)."""
    components, _ = ndimage.label(lesions, structure=FACE_CONNECTIVITY)
    sizes = np.bincount(components.ravel())[1:]
    return components, [int(index) + 1 for index in np.argsort(-sizes, kind="stable")]


def measure_output(spec: OutputSpec, tolerances: Tolerances, rim_mm: float,
                   seg_version: str = "v1", names: tuple[str, str] | None = None) -> list[LesionQuality]:
    """Measure every lesion of one output (docs/quality.md); ``names``: how the output and mask are shown in
    the results (default: their paths). DataError for unreadable or inconsistent inputs."""
    volumes = OutputVolumes(spec, seg_version)
    lesions = volumes.mask == LESION_VALUE
    if not lesions.any():
        raise DataError(f"{spec.mask}: the mask holds no lesion voxel (value {LESION_VALUE})")
    report = read_report(spec.report)
    components, ranked = ranked_components(lesions)
    boxes = box_assignment(components, len(ranked), volumes.boxes)
    changed_voxels, changed_max = changed_outside(volumes.ct, volumes.inpainted, lesions, rim_mm,
                                                  volumes.geometry.spacing_zyx)
    output_name, mask_name = names or (str(spec.inpainted), str(spec.mask))
    common = dict(case=spec.case_id, output=output_name, mask=mask_name, changed_outside_voxels=changed_voxels,
                  changed_outside_max_abs_hu=round(changed_max, 3))
    boxes_seen = volumes.boxes is not None
    objects = ndimage.find_objects(components)
    results = []
    for rank, label in enumerate(ranked):
        box = int(boxes[label]) if boxes_seen else None
        same_box = int(np.count_nonzero(boxes[1:] == box)) if box else 1
        measured = _measure_lesion(volumes, report, spec.report, components, label, objects[label - 1], lesions,
                                   tolerances)
        results.append(LesionQuality(lesion=rank, components=same_box, box=box, **common, **measured))
    return results


def _measure_lesion(volumes: OutputVolumes, report: dict, report_path: Path, components: np.ndarray, label: int,
                    box: tuple[slice, ...], lesions: np.ndarray, tolerances: Tolerances) -> dict[str, Any]:
    """The per-lesion fields of :class:`LesionQuality` for component ``label`` (bounding box ``box``)."""
    spacing = volumes.geometry.spacing_zyx
    margins = [math.ceil(tolerances.shell_mm / s) + 2 for s in spacing]
    window = _grown(box, margins, components.shape)
    lesion = components[window] == label
    # As LINet does, the organ entry is chosen on a window around the lesion.
    key = select_organ_key(report, lesion, None if volumes.seg is None else volumes.seg[window])
    attributes = report_attributes(report, key)
    values = volumes.inpainted[window][lesion].astype(np.float64)
    voxels = int(lesion.sum())
    voxel_mm3 = voxel_volume_mm3(volumes.geometry)
    extent_zyx = [s.stop - s.start for s in box]
    extent = tuple(int(extent_zyx[axis]) for axis in memory_axis_of_file_axes(volumes.geometry))
    fields: dict[str, Any] = dict(
        organ=organ_name(key), organ_id=int(key), voxels=voxels, volume_mm3=round(voxels * voxel_mm3, 3),
        extent_vox=extent, mean_hu=round(float(values.mean()), 3), std_hu=round(float(values.std()), 3),
        margin_gradient_hu_per_mm=round(margin_gradient(volumes.inpainted[window], lesion, spacing), 3))
    size = requested_size(report, key, attributes, report_path)
    if size is not None:
        requested = math.pi / 6 * float(np.prod(size)) * voxel_mm3
        ratios = [e / s for e, s in zip(extent, size)]
        fields.update(requested_size_vox=tuple(size), requested_volume_mm3=round(requested, 3),
                      volume_ratio=round(voxels * voxel_mm3 / requested, 4),
                      extent_ratio_min=round(min(ratios), 4), extent_ratio_max=round(max(ratios), 4))
    if attributes.get("CT value"):
        requested_hu = float(short_ct_value(attributes["CT value"], report_path).split()[0])
        fields.update(requested_hu=requested_hu, hu_error=round(fields["mean_hu"] - requested_hu, 3))
    fields["density_requested"] = requested_density(attributes.get("density"))
    if volumes.seg is not None:
        organ_full = organ_mask(volumes.seg, report, key)
        organ = organ_full[window]
        inside = ndimage.binary_dilation(organ, CUBE) if is_hollow(int(key)) else organ
        fields["inside_organ_fraction"] = round(float((lesion & inside).sum()) / voxels, 4)
        distance = ndimage.distance_transform_edt(~lesion, sampling=spacing)
        shell = (distance > 0) & (distance <= tolerances.shell_mm) & organ & ~lesions[window]
        reference = reference_hu(volumes.ct, window, shell, organ_full, lesions)
        if reference is not None:
            contrast = fields["mean_hu"] - reference
            fields.update(organ_reference_hu=round(reference, 3), contrast_hu=round(contrast, 3),
                          density_measured=measured_density(contrast, tolerances.iso_band_hu))
    return fields
