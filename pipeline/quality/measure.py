"""Measurements of every lesion of one inpainted CT (no pass/fail here: see :mod:`quality.gate`).

Per lesion (a face-connected component of value 2 of the output's mask, ranked by
:func:`ldm.data.components.ranked_components`, as LINet ranks them):

- the description :func:`ldm.lesion.describe_lesion` gives on the inpainted CT, in the organ of the report entry
  that overlaps the lesion most (:func:`ldm.data.attributes.select_organ_key` on a window around the lesion;
  lung lobes: the union of the report's lobes), every lesion of the output excluded from the organ reference:
  exactly what ``describe.py`` says of the output (the same phrases for the same lesion); sizes count along the
  **file's** axes (those of the report's ``size``), the voxel volume is ``|det(affine)|``;
- the request (:class:`ldm.lesion.Request`): the report entry's attributes, its size (``size``, else element
  ``[3][1]``), its ``CT value``; the ellipsoid inscribed in the size (pi/6 a b c voxels, what LMNet aims for)
  and the ratios of the measured volume and extent to it;
- the per-attribute verdicts of :func:`ldm.lesion.compare` (agree / disagree / n/a with the reason);
- components: mask components whose best-overlapping box of ``bbox.nii.gz`` is this lesion's box (1 without boxes);
- changes outside the paste region (the exact region :func:`inference.paste.lesion_region` lets the paste touch:
  the lesions and every voxel closer than ``rim_mm`` to them, with the voxel spacing): count and largest
  |difference| in HU against the input CT, for the whole output.

Without a segmentation only size, HU and the numeric checks are measured (no organ to describe the lesion in).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ldm.data.attributes import organ_mask, report_attributes, read_report, select_organ_key, short_ct_value
from ldm.data.components import FACE_CONNECTIVITY, ranked_components, voxel_volume_mm3
from ldm.data.organs import organ_name, to_v1
from ldm.data.volume import Geometry, read_geometry, read_label, read_volume
from ldm.errors import DataError
from ldm.lesion import Request, Verdict, compare, describe_lesion
from ldm.lesion.measure import interior_values
from inference.paste import lesion_region, rim_voxels, working_dtype
from preprocessing.report_format import parse_size
from quality.outputs import OutputSpec
from quality.snapshots import before_after_png
from quality.tolerances import Tolerances

LESION_VALUE = 2
GRID_ATOL_MM = 1e-3


@dataclass
class LesionQuality:
    """Measurements and verdict of one lesion; ``None`` where a value cannot be measured or was not requested.

    Sizes along the file's axes (``*_vox`` triples), HU in HU, lengths in mm, volumes in mm3. ``attributes``: the
    per-attribute verdicts of :func:`ldm.lesion.compare`; ``checks`` maps a check name to True (pass), False
    (fail) or None (n/a); ``passed`` is True when no check failed."""

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
    interior_mean_hu: float
    components: int
    changed_outside_voxels: int
    changed_outside_max_abs_hu: float
    margin_gradient_hu_per_mm: float | None = None
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
    attributes: list[Verdict] = field(default_factory=list)
    checks: dict[str, bool | None] = field(default_factory=dict)
    failed_attributes: list[str] = field(default_factory=list)
    passed: bool = False
    preview_png: bytes = field(default=b"", repr=False)

    @property
    def failed_checks(self) -> list[str]:
        """Names of the checks that failed, in check order; ``attributes`` names the disagreeing ones."""
        return [f"attributes ({', '.join(self.failed_attributes)})" if name == "attributes" else name
                for name, verdict in self.checks.items() if verdict is False]

    def verdict(self, attribute: str) -> Verdict | None:
        """The verdict of ``attribute`` (None when the lesion was not described)."""
        return next((item for item in self.attributes if item.attribute == attribute), None)


def _same_grid(reference: Geometry, other: Geometry, path: Path) -> None:
    if reference.shape_zyx != other.shape_zyx or not np.allclose(reference.affine, other.affine, atol=GRID_ATOL_MM):
        raise DataError(f"{path}: its voxel grid (shape {other.shape}) differs from the input CT's "
                        f"({reference.source}, shape {reference.shape}); every volume of a case must share one grid")


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


def requested_size(report: dict, key: str, attributes: dict[str, Any], source: Path) -> tuple[int, int, int] | None:
    """The report's lesion size (voxels along the file's axes): ``size``, else element ``[3][1]``, else None."""
    if attributes.get("size"):
        return parse_size(attributes["size"], what=f"{source}: size")
    entry = report[key]
    if len(entry) > 3 and isinstance(entry[3], list) and len(entry[3]) > 1:
        return parse_size(entry[3][1], what=f"{source}: element [3][1]")
    return None


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


def measure_output(spec: OutputSpec, tolerances: Tolerances, rim_mm: float,
                   seg_version: str = "v1", names: tuple[str, str] | None = None) -> list[LesionQuality]:
    """Measure every lesion of one output (docs/quality.md); ``names``: how the output and mask are shown in
    the results (default: their paths). DataError for unreadable or inconsistent inputs."""
    volumes = OutputVolumes(spec, seg_version)
    lesions = volumes.mask == LESION_VALUE
    if not lesions.any():
        raise DataError(f"{spec.mask}: the mask holds no lesion voxel (value {LESION_VALUE})")
    report = read_report(spec.report)
    components, ranked, objects = ranked_components(lesions)
    boxes = box_assignment(components, len(ranked), volumes.boxes)
    changed_voxels, changed_max = changed_outside(volumes.ct, volumes.inpainted, lesions, rim_mm,
                                                  volumes.geometry.spacing_zyx)
    output_name, mask_name = names or (str(spec.inpainted), str(spec.mask))
    common = dict(case=spec.case_id, output=output_name, mask=mask_name, changed_outside_voxels=changed_voxels,
                  changed_outside_max_abs_hu=round(changed_max, 3))
    boxes_seen = volumes.boxes is not None
    results = []
    for rank, label in enumerate(ranked):
        box = int(boxes[label]) if boxes_seen else None
        same_box = int(np.count_nonzero(boxes[1:] == box)) if box else 1
        measured = _measure_lesion(volumes, report, spec.report, components, label, objects[label - 1], lesions,
                                   tolerances)
        results.append(LesionQuality(lesion=rank, components=same_box, box=box, **common, **measured))
    return results


def lesion_request(report: dict, key: str, source: Path) -> Request:
    """What report entry ``key`` asks of its lesion (:class:`ldm.lesion.Request`)."""
    attributes = report_attributes(report, key)
    ct_value = attributes.get("CT value")
    hu = float(short_ct_value(ct_value, source).split()[0]) if isinstance(ct_value, str) and ct_value else None
    return Request(int(key), attributes, requested_size(report, key, attributes, source), hu)


def _measure_lesion(volumes: OutputVolumes, report: dict, report_path: Path, components: np.ndarray, label: int,
                    box: tuple[slice, ...], lesions: np.ndarray, tolerances: Tolerances) -> dict[str, Any]:
    """The per-lesion fields of :class:`LesionQuality` for component ``label`` (bounding box ``box``)."""
    geometry = volumes.geometry
    window = _grown(box, [math.ceil(tolerances.shell_mm / s) + 2 for s in geometry.spacing_zyx], components.shape)
    local = components[window] == label
    # As LINet does, the organ entry is chosen on a window around the lesion.
    key = select_organ_key(report, local, None if volumes.seg is None else volumes.seg[window])
    request = lesion_request(report, key, report_path)
    file_axes = geometry.memory_axes
    voxel_mm3 = voxel_volume_mm3(geometry.affine)
    values = volumes.inpainted[window].astype(np.float64)
    voxels = int(local.sum())
    extent_zyx = [s.stop - s.start for s in box]
    fields: dict[str, Any] = dict(
        organ=organ_name(key), organ_id=int(key), voxels=voxels, volume_mm3=round(voxels * voxel_mm3, 3),
        extent_vox=tuple(int(extent_zyx[axis]) for axis in file_axes), mean_hu=round(float(values[local].mean()), 3),
        std_hu=round(float(values[local].std()), 3),
        interior_mean_hu=round(float(interior_values(values, local).mean()), 3),
        preview_png=before_after_png(volumes.ct[window], values, local, geometry.spacing_zyx))
    if volumes.seg is not None:
        description = describe_lesion(volumes.inpainted, components == label, volumes.seg, geometry.spacing_zyx,
                                      int(key), voxel_mm3, file_axes, lesions=lesions,
                                      organ=organ_mask(volumes.seg, report, key), thresholds=tolerances.thresholds)
        m = description.measurement
        verdicts = compare(request, description, tolerances.thresholds)
        density = next(item for item in verdicts if item.attribute == "density")
        fields.update(inside_organ_fraction=round(m.inside_organ_fraction, 4),
                      organ_reference_hu=round(m.organ_reference_hu, 3), contrast_hu=round(m.contrast_hu, 3),
                      margin_gradient_hu_per_mm=round(m.margin_gradient_hu_per_mm, 3), attributes=verdicts,
                      density_measured=density.measured.rstrip(",") or None,
                      density_requested=density.requested.rstrip(",") or None)
    size = request.size_vox
    if size is not None:
        requested = math.pi / 6 * float(np.prod(size)) * voxel_mm3
        ratios = [e / s for e, s in zip(fields["extent_vox"], size)]
        fields.update(requested_size_vox=tuple(size), requested_volume_mm3=round(requested, 3),
                      volume_ratio=round(voxels * voxel_mm3 / requested, 4),
                      extent_ratio_min=round(min(ratios), 4), extent_ratio_max=round(max(ratios), 4))
    if request.ct_value_hu is not None:
        fields.update(requested_hu=request.ct_value_hu,
                      hu_error=round(fields["interior_mean_hu"] - request.ct_value_hu, 3))
    return fields
