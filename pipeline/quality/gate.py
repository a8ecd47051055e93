"""Pass/fail per check, the evaluation of a set of outputs, and the ``quality_gate`` hook of ``test.py``.

The hook (:func:`apply_quality_gate`) evaluates the outputs a LINet run just wrote and **drops** every output with
a failed lesion (or one that cannot be evaluated: the gate fails closed): an inpainted CT cannot lose one lesion
and keep the others, so the whole file goes. Dropped files (``inpainting_<k>.nii.gz``, its ``_label``, its
``_std`` and its ``.png`` preview) are moved to ``<case>/rejected/`` for inspection, never deleted; the case result
then lists them under ``rejected_<kind>`` instead of ``<kind>`` and carries a warning with the failed checks. Lesion-level filtering of the kept outputs is :func:`export_nnunet`'s ``--only-passed``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ldm.errors import DataError, LesionDiffusionError
from ldm.fileio import move_aside
from ldm.lesion import AGREE, NOT_APPLICABLE, Verdict
from quality.evaluation import Evaluation, OutputError
from quality.measure import LesionQuality, measure_output
from quality.outputs import DEFAULT_LABEL_LIST, OutputSpec, Skipped, paste_rim, read_case_rows
from quality.tables import write_results
from quality.tolerances import CHECKS, Tolerances, resolve_tolerances

REJECTED_FOLDER = "rejected"


def _within(value: float | None, low: float, high: float) -> bool | None:
    return None if value is None else bool(low <= value <= high)


def _agrees(verdict: Verdict | None) -> bool | None:
    return None if verdict is None or verdict.verdict == NOT_APPLICABLE else verdict.verdict == AGREE


def disagreeing(lesion: LesionQuality, tolerances: Tolerances) -> list[str]:
    """The attributes of ``fail_attributes`` whose verdict is ``disagree``."""
    return [name for name in tolerances.fail_attributes if _agrees(lesion.verdict(name)) is False]


def grade(lesion: LesionQuality, tolerances: Tolerances) -> LesionQuality:
    """Set ``lesion.checks`` (True pass, False fail, None n/a or disabled) and ``lesion.passed``; returns it."""
    low, high = tolerances.extent_ratio
    extent = None if lesion.extent_ratio_min is None else bool(
        low <= lesion.extent_ratio_min and lesion.extent_ratio_max <= high)
    density = _agrees(lesion.verdict("density"))
    judged = [_agrees(lesion.verdict(name)) for name in tolerances.fail_attributes]
    attributes = None if all(verdict is None for verdict in judged) else all(verdict is not False for verdict in judged)
    verdicts = {
        "hu": None if lesion.hu_error is None else abs(lesion.hu_error) <= tolerances.hu_abs,
        "density": density,
        "inside_organ": _within(lesion.inside_organ_fraction, tolerances.min_inside_fraction, 1.0),
        "volume": _within(lesion.volume_ratio, *tolerances.volume_ratio),
        "extent": extent,
        "components": lesion.components <= tolerances.max_components,
        "unchanged_outside": lesion.changed_outside_voxels <= tolerances.max_changed_outside_voxels,
        "attributes": attributes,
    }
    lesion.checks = {name: None if name in tolerances.disabled else verdicts[name] for name in CHECKS}
    lesion.failed_attributes = disagreeing(lesion, tolerances) if lesion.checks["attributes"] is False else []
    lesion.passed = not lesion.failed_checks
    return lesion


def display_path(path: Path, exp_dir: Path) -> str:
    """``path`` relative to ``exp_dir`` when inside it, else absolute."""
    path, base = Path(path).resolve(), Path(exp_dir).resolve()
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def evaluate_outputs(specs: Sequence[OutputSpec], exp_dir: Path, tolerances: Tolerances, rim_mm: float,
                     skipped: Sequence[Skipped] = (), seg_version: str = "v1", progress: bool = True) -> Evaluation:
    """Measure and grade every lesion of ``specs`` (``rim_mm``: the paste's blend rim); an output that cannot be
    read is recorded, never raised."""
    evaluation = Evaluation([], [], list(skipped), tolerances, rim_mm)
    for spec in tqdm(specs, desc="quality", unit="output", disable=not progress):
        names = (display_path(spec.inpainted, exp_dir), display_path(spec.mask, exp_dir))
        evaluation.outputs.append(names[0])
        try:
            lesions = measure_output(spec, tolerances, rim_mm, seg_version, names)
        except LesionDiffusionError as error:
            evaluation.errors.append(OutputError(spec.case_id, names[0], str(error)))
            continue
        evaluation.lesions.extend(grade(lesion, tolerances) for lesion in lesions)
    return evaluation


@dataclass(frozen=True)
class DroppedOutput:
    """An output the gate removed: where it was, where it went, and why."""

    case_id: str
    output: Path
    moved_to: Path
    reasons: tuple[str, ...]


def _move_aside(path: Path) -> Path:
    """Move ``path`` into ``rejected/`` next to it; an earlier rejected file of that name is kept (``name~2``...)."""
    return move_aside(path, REJECTED_FOLDER)


def _result_spec(result, row: dict | None, label_list: Path) -> OutputSpec:
    if row is None or not row.get("label"):
        raise DataError(f"{label_list}: no mask row for case {result.case_id} (row {result.index}); the gate pairs "
                        "each output with the mask LINet read from this list")
    boxes = Path(row["boxes"]) if row.get("boxes") else None
    measured = result.outputs.get("standardised") or result.outputs["image"]
    return OutputSpec(index=result.index, case_id=result.case_id, image=Path(row["image"]), report=Path(row["type"]),
                      mask=Path(row["label"]), inpainted=Path(measured), seg=Path(row["seg"]), boxes=boxes)


def record_failed_checks(results: Sequence, specs: Sequence[OutputSpec], evaluation: Evaluation,
                         exp_dir: Path) -> None:
    """Set ``disagree`` of every lesion record of ``results`` to the checks the gate failed it on (lesion ``r`` of
    an output is LINet's lesion ``r``: both rank the mask's components largest first)."""
    failed = {(lesion.output, lesion.lesion): lesion.failed_checks for lesion in evaluation.lesions}
    for result, spec in zip(results, specs):
        output = display_path(spec.inpainted, exp_dir)
        for record in result.lesions:
            if (output, record.rank) in failed:
                record.disagree = list(failed[output, record.rank])


def apply_quality_gate(exp_dir: str | os.PathLike, results: Sequence, tolerances: Tolerances | None = None,
                       rim_mm: float | None = None, label_list_name: str = DEFAULT_LABEL_LIST, seg_version: str = "v1",
                       progress: bool = True) -> list[DroppedOutput]:
    """Evaluate the outputs of a LINet run's ``results`` (``inference.results.CaseResult``; their masks are the
    rows of ``label_list_name``), write ``quality.csv``/``quality_summary.json``/``quality.png`` into ``exp_dir``
    and drop the failing outputs (module docstring); the results are updated in place. Returns what was dropped.

    ``tolerances``: default from ``EXP_DIR/quality.toml`` or the built-in defaults; ``rim_mm``: the run's blend
    rim (default: ``linet_report.json``, else 2 mm)."""
    exp_dir = Path(exp_dir)
    tolerances = tolerances or resolve_tolerances(exp_dir)
    rim_mm = paste_rim(exp_dir, rim_mm)
    rows = {row["index"]: row for row in read_case_rows(exp_dir, label_list_name)}
    done = [result for result in results if result.ok and result.outputs.get("image")]
    specs = [_result_spec(result, rows.get(result.index), exp_dir / label_list_name) for result in done]
    evaluation = evaluate_outputs(specs, exp_dir, tolerances, rim_mm, seg_version=seg_version, progress=progress)
    write_results(exp_dir, evaluation)
    record_failed_checks(done, specs, evaluation, exp_dir)
    failed = evaluation.failed_outputs()
    dropped = []
    for result, spec in zip(done, specs):
        reasons = failed.get(display_path(spec.inpainted, exp_dir))
        if not reasons:
            continue
        moved = _move_aside(Path(result.outputs.pop("image")))
        result.outputs["rejected_image"] = str(moved)
        # Every file of the output goes: the CT on the user's grid, its label, the standardised CT, the preview.
        for kind in ("label", "standardised", "preview"):
            path = result.outputs.pop(kind, None)
            if path and Path(path).is_file():
                result.outputs[f"rejected_{kind}"] = str(_move_aside(Path(path)))
        result.warnings.append(f"quality gate: {'; '.join(reasons)}; output moved to {display_path(moved, exp_dir)}")
        dropped.append(DroppedOutput(result.case_id, spec.inpainted, moved, tuple(reasons)))
    return dropped


def gate_stage(stage: str, exp_dir: Path, results: Sequence, options) -> list[DroppedOutput]:
    """The ``after_stage`` hook of ``inference.runner.run_inference``: the gate after a LINet run whose options
    (``inference.options.InferenceOptions``) set ``quality_gate``; nothing otherwise. Returns what was dropped."""
    if stage != "linet" or not options.quality_gate:
        return []
    # The rim is passed explicitly: linet_report.json is written after the gate (or is an older run's).
    return apply_quality_gate(exp_dir, results, rim_mm=options.rim_mm, label_list_name=options.lists["label"],
                              seg_version=options.seg_version, progress=options.progress)
