"""One case of the dataset, start to finish: standardised CT, 0/1/2 label, organ segmentations, measured report.

Outputs go to ``OUT/cases/<case>/``:

- ``ct.nii.gz``: the CT reoriented to LPS and resampled to ``--spacing`` (:func:`preprocessing.standardise.standardise_ct`);
- ``coarseg.nii.gz``: the TotalSegmentator v1 segmentation of this CT (run as ``preprocess.py`` runs it, or the
  ``--seg-dir`` file converted from ``--seg-version``), nearest-neighbour on the CT's grid;
- ``seg.nii.gz``: the same with the organ (dataset label, or the segmentation's organ) and its lesions painted
  as the organ id: what a segmentation of the healthy organ would show, which is what the original's ``seg_list``
  held (a healthy counterpart's segmentation) and what LMNet's organ mask is read from;
- ``label.nii.gz``: 0 background, 1 organ, 2 lesion (the original convention), on the CT's grid;
- ``type.json``: the report of the **largest** lesion (face-connected component of the lesion labels). The
  format keys entries by organ, so several lesions of one organ cannot each have an entry, and training centres
  its crop on the largest component, which is then the one the text describes. Every component's size is
  listed in ``prepare_report.json``. The lesion is measured on the dataset's own grid (the CT's HU as scanned,
  the label as drawn, the segmentation brought there by nearest neighbour); its ``size`` is its box on the
  standardised grid;
- ``prepare.json``: the fingerprint of the inputs and options, written last. A rerun skips a case whose
  fingerprint matches and whose outputs all exist.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ldm.data.components import ranked_components, voxel_volume_mm3
from ldm.data.organs import organ_id as organ_id_of
from ldm.data.volume import Geometry, read_geometry
from ldm.errors import DataError
from ldm.fileio import write_json_atomic
from ldm.lesion import describe_lesion
from preprocessing.case_run import CaseResult as BaseCaseResult
from preprocessing.case_run import content_hash, errors_into, file_sha256, finished_record, fingerprint_fields
from preprocessing.segment import import_segmentation, run_totalsegmentator
from preprocessing.standardise import labels_on_grid, load_nifti, standardise_ct, write_file_grid
from preparation.source import SourceCase

OUTPUT_FILES = {"image": "ct.nii.gz", "label": "label.nii.gz", "seg": "seg.nii.gz", "coarseg": "coarseg.nii.gz",
                "type": "type.json"}
CASES_DIR = "cases"
RECORD_FILE = "prepare.json"
GRID_ATOL_MM = 1e-3
ORGAN_VALUE, LESION_VALUE = 1, 2


@dataclass
class PrepareOptions:
    """Settings shared by all cases (flags of ``prepare_dataset.py``)."""

    organ: str
    lesion_labels: tuple[int, ...]
    organ_labels: tuple[int, ...] = ()
    lesion_type: str = "lesion"
    spacing_xyz: tuple[float, float, float] = (1.0, 1.0, 1.0)
    seg_version: str = "v1"
    seg_task: str = "total"
    seg_fast: bool = False
    seg_device: str = "auto"
    overwrite: bool = False
    debug: bool = False

    @property
    def organ_id(self) -> int:
        """TotalSegmentator v1 id of ``organ``."""
        return organ_id_of(self.organ)


@dataclass
class CaseResult(BaseCaseResult):
    """:class:`preprocessing.case_run.CaseResult` with the case's split and what was measured: the largest
    lesion, every lesion's size, undecided phrases and the report's attributes."""

    split: str = ""
    lesion: dict[str, Any] = field(default_factory=dict)
    lesions: list[dict[str, Any]] = field(default_factory=list)
    undecided: list[str] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)


def fingerprint(case: SourceCase, options: PrepareOptions, reporter_settings: dict[str, Any]) -> str:
    """Hash of everything the case's outputs depend on: input bytes, options and reporter."""
    return content_hash({"image": file_sha256(case.image), "label": file_sha256(case.label),
                         "seg": file_sha256(case.seg) if case.seg else None, "options": fingerprint_fields(options),
                         "reporter": reporter_settings})


def file_order(path: Path) -> np.ndarray:
    """The voxel array of a NIfTI file in its own (file) axis order, as stored."""
    return np.asanyarray(load_nifti(path).dataobj)


def check_inputs(case: SourceCase, lesion_labels: tuple[int, ...]) -> None:
    """DataError (naming the file) when the case cannot be prepared: missing file, label on another grid than
    the image, or no lesion voxel in the label."""
    if case.problem:
        raise DataError(case.problem)
    image, label = read_geometry(case.image), read_geometry(case.label)
    if image.shape != label.shape or not np.allclose(image.affine, label.affine, atol=GRID_ATOL_MM):
        raise DataError(f"label {case.label} lies on another voxel grid than its image (shape {label.shape} vs "
                        f"{image.shape}, or a different affine); nnU-Net needs both on one grid")
    values = np.unique(file_order(case.label))
    if not np.isin(lesion_labels, values).any():
        raise DataError(f"label {case.label} has no lesion voxel (value {' or '.join(map(str, lesion_labels))}); "
                        f"its values are {', '.join(str(int(v)) for v in values)}")


def _organ_extent(mask: np.ndarray) -> tuple[int, int, int]:
    where = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    return tuple(int(w[-1] - w[0] + 1) for w in where)


def _volumes(case: SourceCase, options: PrepareOptions, outputs: dict[str, Path], geometry: Geometry
             ) -> tuple[np.ndarray, np.ndarray]:
    """Write label and seg; returns ``(lesions, organ)`` in file order on the standardised CT's grid."""
    source = labels_on_grid(case.label, geometry)
    lesions = np.isin(source, options.lesion_labels)
    if not lesions.any():
        raise DataError(f"label {case.label}: every lesion voxel vanished at --spacing "
                        f"{' '.join(f'{s:g}' for s in options.spacing_xyz)} mm; use a finer spacing")
    coarseg = np.asarray(file_order(outputs["coarseg"]), dtype=np.int16)
    if options.organ_labels:
        organ = np.isin(source, options.organ_labels) & ~lesions
        where = f"label {case.label} (value {' or '.join(map(str, options.organ_labels))})"
    else:
        organ = (coarseg == options.organ_id) & ~lesions
        where = f"the segmentation {outputs['coarseg']}"
    if not organ.any():
        raise DataError(f"{where} holds no {options.organ} voxel outside the lesions")
    seg = coarseg.copy()
    seg[organ | lesions] = options.organ_id
    write_file_grid(outputs["seg"], seg, geometry, np.uint8)
    label = np.where(lesions, LESION_VALUE, np.where(organ, ORGAN_VALUE, 0))
    write_file_grid(outputs["label"], label, geometry, np.uint8)
    return lesions, organ


def _native_masks(case: SourceCase, options: PrepareOptions, coarseg_path: Path
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Geometry]:
    """``(lesions, organ, v1 segmentation, geometry)`` on the dataset's own grid, in file order."""
    geometry = read_geometry(case.image)
    source = np.rint(np.asarray(file_order(case.label), dtype=np.float64))
    lesions = np.isin(source, options.lesion_labels)
    segmentation = labels_on_grid(coarseg_path, geometry)
    if options.organ_labels:
        organ = np.isin(source, options.organ_labels) & ~lesions
    else:
        organ = (segmentation == options.organ_id) & ~lesions
    if not organ.any():
        raise DataError(f"no {options.organ} voxel outside the lesions on the grid of {case.image}")
    return lesions, organ, segmentation, geometry


def _describe(case: SourceCase, options: PrepareOptions, reporter: Any, outputs: dict[str, Path],
              geometry: Geometry, lesions: np.ndarray, organ: np.ndarray, result: CaseResult) -> None:
    """Measure the largest lesion on the dataset's own grid (its size on the standardised one), write its
    report, fill the result."""
    components, ranked, boxes = ranked_components(lesions)
    result.lesions = [{"voxels": int(np.count_nonzero(components[boxes[label - 1]] == label)),
                       "box_start_vox": [int(s.start) for s in boxes[label - 1]],
                       "size_vox": [int(s.stop - s.start) for s in boxes[label - 1]]} for label in ranked]
    native_lesions, native_organ, segmentation, native = _native_masks(case, options, outputs["coarseg"])
    native_components, native_ranked, _ = ranked_components(native_lesions)
    ct = load_nifti(case.image).get_fdata(dtype=np.float32)
    spacing = tuple(float(s) for s in np.sqrt((native.affine[:3, :3] ** 2).sum(axis=0)))
    description = describe_lesion(ct, native_components == native_ranked[0], segmentation, spacing, options.organ_id,
                                  voxel_volume_mm3(native.affine), lesions=native_lesions, organ=native_organ)
    largest = result.lesions[0]
    measurement = replace(description.measurement, size_vox=tuple(largest["size_vox"]),
                          box_start_vox=tuple(largest["box_start_vox"]))
    phrases = description.phrases
    extent = _organ_extent(organ | lesions)
    standard_spacing = tuple(float(s) for s in np.sqrt((geometry.affine[:3, :3] ** 2).sum(axis=0)))
    report = reporter.generate(options.organ_id, phrases, measurement, extent, standard_spacing, options.lesion_type)
    write_json_atomic(outputs["type"], report)
    result.lesion = measurement.as_dict()
    result.undecided = phrases.undecided
    result.attributes = report[str(options.organ_id)][2]


def _run_steps(case: SourceCase, options: PrepareOptions, reporter: Any, segmentation_slots: Any,
               outputs: dict[str, Path], result: CaseResult) -> None:
    with result.step("standardise"):
        standardise_ct(case.image, outputs["image"], options.spacing_xyz)
    with result.step("segment"):
        if case.seg is not None:
            import_segmentation(case.seg, options.seg_version, outputs["image"], outputs["coarseg"])
        else:
            with segmentation_slots:
                run_totalsegmentator(outputs["image"], outputs["coarseg"], options.seg_task, options.seg_fast,
                                     options.seg_device)
    geometry = read_geometry(outputs["image"])
    with result.step("label"):
        lesions, organ = _volumes(case, options, outputs, geometry)
    with result.step("report"):
        _describe(case, options, reporter, outputs, geometry, lesions, organ, result)


def prepare_case(case: SourceCase, out_dir: Path, options: PrepareOptions, reporter: Any,
                 segmentation_slots: Any, split: str) -> CaseResult:
    """Prepare (or skip) one case; never raises for a bad case: the error is in the result."""
    case_dir = out_dir / CASES_DIR / case.case_id
    outputs = {name: case_dir / file_name for name, file_name in OUTPUT_FILES.items()}
    result = CaseResult(case.index, case.case_id, {"image": str(case.image), "label": str(case.label),
                                                   "seg": str(case.seg) if case.seg else None}, split=split)
    with errors_into(result, options.debug):
        with result.step("inputs"):
            check_inputs(case, options.lesion_labels)
            expected = fingerprint(case, options, reporter.settings)
        result.outputs = {name: str(path) for name, path in outputs.items()}
        record = None if options.overwrite else finished_record(case_dir, RECORD_FILE, OUTPUT_FILES, expected)
        if record is not None:
            for key in ("lesion", "lesions", "undecided", "attributes"):
                setattr(result, key, record.get(key, getattr(result, key)))
            result.status = "skipped"
            return result
        (case_dir / RECORD_FILE).unlink(missing_ok=True)
        _run_steps(case, options, reporter, segmentation_slots, outputs, result)
        write_json_atomic(case_dir / RECORD_FILE, {
            "fingerprint": expected, "outputs": OUTPUT_FILES, "seconds": result.seconds, "lesion": result.lesion,
            "lesions": result.lesions, "undecided": result.undecided, "attributes": result.attributes})
        result.status = "done"
    return result
