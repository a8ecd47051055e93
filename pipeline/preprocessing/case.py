"""One case, start to finish: standardise, segment, report, place boxes; timed, seeded, skipped when done.

Outputs go to ``<exp>/<case_id>/``: ``ct.nii.gz`` (standardised CT), ``totalseg.nii.gz`` (v1 organ labels on the
CT's grid), ``type.json`` (the report), ``bbox.nii.gz`` (boxes of value 2 on the CT's grid) and
``preprocess.json`` (the fingerprint of the inputs and options, written last). A rerun skips a case whose
fingerprint matches and whose outputs all exist. Randomness comes from ``SeedSequence([seed, row])``, so the
result of a case does not depend on the order in which parallel workers run.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ldm.data.volume import Geometry, read_geometry, read_label, read_volume, write_volume
from ldm.errors import DataError
from ldm.fileio import write_json_atomic
from ldm.lesion import DEFAULT
from ldm.lesion.measure import aorta_hu
from preprocessing.bbox import box_problem, boxes_mask, organ_extent, place_boxes
from preprocessing.case_run import CaseResult as BaseCaseResult
from preprocessing.case_run import content_hash, errors_into, file_sha256, finished_record, fingerprint_fields
from preprocessing.inputs import CaseInput, require_input
from preprocessing.report_format import ReportRequest, size_bound_problem
from preprocessing.segment import import_segmentation, run_totalsegmentator
from preprocessing.standardise import standardise_ct
from preprocessing.user_attributes import CaseAttributes, interpret_attributes, parse_attribute_line

OUTPUT_FILES = {"img": "ct.nii.gz", "seg": "totalseg.nii.gz", "type": "type.json", "bbox": "bbox.nii.gz"}
RECORD_FILE = "preprocess.json"
# Largest difference (mm) between the affines of a CT and its --seg-list segmentation that still counts as one grid.
GRID_ATOL_MM = 1e-3
# Inference keeps only lesion components larger than this (original LMNet/LINet rule).
MIN_INFERENCE_VOXELS = 50


@dataclass
class PreprocessOptions:
    """Settings shared by all cases (CLI flags of ``preprocess.py``)."""

    spacing_xyz: tuple[float, float, float] = (1.0, 1.0, 1.0)
    seg_version: str = "v1"
    seg_task: str = "total"
    seg_fast: bool = False
    seg_device: str = "auto"
    boxes_per_case: int = 1
    max_lesion_size_xyz: tuple[int, int, int] | None = None
    seed: int = 0
    overwrite: bool = False
    debug: bool = False


@dataclass
class CaseResult(BaseCaseResult):
    """:class:`preprocessing.case_run.CaseResult` with the steps that finished, in order, and warnings."""

    steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        with super().step(name):
            yield
        self.steps.append(name)


def case_fingerprint(case: CaseInput, options: PreprocessOptions, reporter_settings: dict[str, Any]) -> str:
    """Hash of everything a case's outputs depend on: input bytes, attribute line, options, reporter, row."""
    content = {
        "ct": file_sha256(case.ct_path),
        "segmentation": file_sha256(case.seg_path) if case.seg_path else None,
        "attributes": json.loads(case.attributes_line),
        "options": fingerprint_fields(options),
        "reporter": reporter_settings,
        "row": case.index,
    }
    return content_hash(content)


def _finished(case_dir: Path, fingerprint: str) -> bool:
    # A record without source_ct predates it; inference needs it, so such a case is redone.
    record = finished_record(case_dir, RECORD_FILE, OUTPUT_FILES, fingerprint)
    return record is not None and bool(record.get("source_ct"))


def check_same_grid(seg: Geometry, ct: Geometry) -> None:
    """DataError unless the segmentation ``seg`` lies on the voxel grid of ``ct`` (same shape and affine)."""
    if seg.shape != ct.shape:
        raise DataError(f"{seg.source}: the segmentation's grid ({'x'.join(map(str, seg.shape))} voxels) does not "
                        f"match its CT {ct.source} ({'x'.join(map(str, ct.shape))} voxels); --seg-list needs the "
                        "segmentation of that very CT, on its grid")
    if not np.allclose(seg.affine, ct.affine, atol=GRID_ATOL_MM):
        raise DataError(f"{seg.source}: the segmentation's affine does not match its CT {ct.source} (same shape, "
                        "other position, spacing or orientation); --seg-list needs the segmentation of that very "
                        "CT, on its grid")


def _contrast_enhanced(ct: np.ndarray, segmentation: np.ndarray) -> bool | None:
    aorta = aorta_hu(ct, segmentation)
    return None if aorta is None else aorta > DEFAULT.enhanced_aorta_hu


def _request(attributes: CaseAttributes, ct: np.ndarray, organ: np.ndarray, segmentation: np.ndarray,
             options: PreprocessOptions) -> ReportRequest:
    def size_problem(size_xyz: tuple[int, int, int], cavity: str) -> str | None:
        bound = size_bound_problem(size_xyz, options.max_lesion_size_xyz)
        return bound or box_problem(organ, tuple(size_xyz)[::-1], options.boxes_per_case, cavity, attributes.hollow,
                           attributes.organ_name)

    return ReportRequest(
        organ_id=attributes.organ_id, organ_name=attributes.organ_name, hollow=attributes.hollow,
        lesion_type=attributes.lesion_type, organ_extent_xyz=organ_extent(organ)[::-1],
        spacing_xyz_mm=tuple(options.spacing_xyz), fixed=dict(attributes.fixed),
        organ_mean_hu=float(ct[organ].mean()), contrast_enhanced=_contrast_enhanced(ct, segmentation),
        size_problem=size_problem, max_size_xyz=options.max_lesion_size_xyz,
    )


def _run_steps(case: CaseInput, attributes: CaseAttributes, options: PreprocessOptions, reporter: Any,
               segmentation_slots: contextlib.AbstractContextManager, outputs: dict[str, Path],
               result: CaseResult) -> None:
    with result.step("standardise"):
        standardise_ct(case.ct_path, outputs["img"], options.spacing_xyz)
    with result.step("segment"):
        if case.seg_path:
            import_segmentation(case.seg_path, options.seg_version, outputs["img"], outputs["seg"])
        else:
            with segmentation_slots:
                run_totalsegmentator(outputs["img"], outputs["seg"], options.seg_task, options.seg_fast, options.seg_device)
    report_rng, box_rng = (np.random.default_rng(s) for s in np.random.SeedSequence([options.seed, case.index]).spawn(2))
    with result.step("report"):
        ct, geometry = read_volume(outputs["img"])
        segmentation, _ = read_label(outputs["seg"])
        organ = segmentation == attributes.organ_id
        if not organ.any():
            source = case.seg_path or "the TotalSegmentator output"
            raise DataError(f"organ {attributes.organ_name!r} (v1 id {attributes.organ_id}) is absent from the segmentation {source}")
        report = reporter.generate(_request(attributes, ct, organ, segmentation, options), report_rng)
        write_json_atomic(outputs["type"], report)
    with result.step("boxes"):
        entry = report[str(attributes.organ_id)]
        size_zyx = tuple(entry[3][1][0])[::-1]
        boxes = place_boxes(organ, size_zyx, options.boxes_per_case, entry[2]["cavity"], attributes.hollow, box_rng,
                            attributes.organ_name)
        write_volume(outputs["bbox"], boxes_mask(organ.shape, boxes), geometry, dtype=np.uint8)
    if int(np.prod(size_zyx)) <= MIN_INFERENCE_VOXELS:
        result.warnings.append(f"lesion box of {int(np.prod(size_zyx))} voxels: inference keeps boxes larger than "
                               f"{MIN_INFERENCE_VOXELS} voxels only when there are some")


def process_case(case: CaseInput, exp_dir: Path, options: PreprocessOptions, reporter: Any,
                 segmentation_slots: contextlib.AbstractContextManager) -> CaseResult:
    """Run (or skip) one case; never raises for a bad case: the error is in the result."""
    case_dir = exp_dir / case.case_id
    outputs = {name: case_dir / file_name for name, file_name in OUTPUT_FILES.items()}
    result = CaseResult(case.index, case.case_id,
                        {"ct": case.ct_path, "segmentation": case.seg_path, "attributes": case.where})
    with errors_into(result, options.debug):
        with result.step("inputs"):
            attributes = interpret_attributes(parse_attribute_line(case.attributes_line, case.where), case.where)
            require_input(case.ct_path, case.ct_tried, "CT")
            ct_geometry = read_geometry(case.ct_path)
            if case.seg_path:
                require_input(case.seg_path, case.seg_tried, "segmentation")
                check_same_grid(read_geometry(case.seg_path), ct_geometry)
            fingerprint = case_fingerprint(case, options, reporter.settings)
        result.outputs = {name: str(path) for name, path in outputs.items()}
        if not options.overwrite and _finished(case_dir, fingerprint):
            result.status = "skipped"
            return result
        (case_dir / RECORD_FILE).unlink(missing_ok=True)
        _run_steps(case, attributes, options, reporter, segmentation_slots, outputs, result)
        # source_ct: inference writes its results on this CT's grid (inference.cases.recorded_source).
        write_json_atomic(case_dir / RECORD_FILE, {"fingerprint": fingerprint, "outputs": OUTPUT_FILES,
                                                   "source_ct": str(Path(case.ct_path).resolve()),
                                                   "seconds": result.seconds, "warnings": result.warnings})
        result.status = "done"
    return result
