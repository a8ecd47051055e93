"""``EXP_DIR/quality.csv`` (one row per lesion), ``EXP_DIR/quality_summary.json`` and the plot, written atomically.

CSV columns carry their unit in the name (``_mm3``, ``_vox``, ``_hu``, ``_hu_per_mm``); sizes along the file's
axes are ``_i/_j/_k`` (the axes of the report's ``size``). Check columns ``check_<name>`` hold ``pass``, ``fail``
or ``n/a``; ``failed_checks`` lists the failed ones separated by ``;``; ``passed`` is ``true``/``false``. Empty
cells are values that could not be measured or were not requested. ``attribute_<name>`` columns hold each report
attribute's verdict (``agree``, ``disagree``, ``n/a``; empty when the lesion was not described, e.g. without a
segmentation); ``failed_attributes`` lists the disagreeing attributes that failed the lesion.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ldm.fileio import write_json_atomic, write_text_atomic
from ldm.lesion import ATTRIBUTES
from quality.evaluation import Evaluation
from quality.measure import LesionQuality
from quality.plot import plot_quality
from quality.fidelity import write_fidelity
from quality.review import write_review
from quality.tolerances import CHECKS

CSV_NAME = "quality.csv"
SUMMARY_NAME = "quality_summary.json"
PLOT_NAME = "quality.png"
AXES = ("i", "j", "k")


def attribute_column(attribute: str) -> str:
    """``attribute_<name>``, spaces as underscores (``CT value`` -> ``attribute_ct_value``)."""
    return "attribute_" + attribute.lower().replace(" ", "_")


LEADING = ("case", "output", "lesion", "organ", "organ_id", "voxels", "volume_mm3", "requested_volume_mm3",
           "volume_ratio")
MIDDLE = ("extent_ratio_min", "extent_ratio_max", "inside_organ_fraction", "mean_hu", "std_hu", "interior_mean_hu",
          "requested_hu",
          "hu_error", "organ_reference_hu", "contrast_hu", "density_measured", "density_requested",
          "margin_gradient_hu_per_mm", "components", "box", "changed_outside_voxels", "changed_outside_max_abs_hu")
COLUMNS = (LEADING + tuple(f"extent_{axis}_vox" for axis in AXES) + tuple(f"requested_{axis}_vox" for axis in AXES)
           + MIDDLE + tuple(f"check_{name}" for name in CHECKS)
           + tuple(attribute_column(name) for name in ATTRIBUTES) + ("failed_checks", "failed_attributes", "passed",
                                                                     "mask"))
VERDICTS = {True: "pass", False: "fail", None: "n/a"}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def csv_row(lesion: LesionQuality) -> dict[str, str]:
    """One CSV row (column -> text) for a graded lesion."""
    row = {name: _cell(getattr(lesion, name)) for name in LEADING + MIDDLE + ("mask", "passed")}
    requested = lesion.requested_size_vox or (None, None, None)
    for axis, extent, size in zip(AXES, lesion.extent_vox, requested):
        row[f"extent_{axis}_vox"], row[f"requested_{axis}_vox"] = _cell(extent), _cell(size)
    for name in CHECKS:
        row[f"check_{name}"] = VERDICTS[lesion.checks.get(name)]
    for name in ATTRIBUTES:
        verdict = lesion.verdict(name)
        row[attribute_column(name)] = "" if verdict is None else verdict.verdict
    row["failed_checks"] = ";".join(lesion.failed_checks)
    row["failed_attributes"] = ";".join(lesion.failed_attributes)
    return row


def csv_text(lesions: list[LesionQuality]) -> str:
    """The whole CSV (header and one row per lesion)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_row(lesion) for lesion in lesions)
    return buffer.getvalue()


def summary(evaluation: Evaluation) -> dict[str, Any]:
    """Counts, pass rate (passed lesions / lesions, None without lesions), failures and n/a per check, settings."""
    lesions = evaluation.lesions
    passed = sum(lesion.passed for lesion in lesions)
    failed_outputs = evaluation.failed_outputs()
    return {
        "lesions": len(lesions),
        "passed": passed,
        "failed": len(lesions) - passed,
        "pass_rate": round(passed / len(lesions), 4) if lesions else None,
        "outputs": len(evaluation.outputs),
        "outputs_passed": sum(output not in failed_outputs for output in evaluation.outputs),
        "failures_by_check": {name: sum(lesion.checks.get(name) is False for lesion in lesions) for name in CHECKS},
        "not_applicable_by_check": {name: sum(lesion.checks.get(name) is None for lesion in lesions)
                                    for name in CHECKS},
        "tolerances": evaluation.tolerances.as_dict(),
        "paste_region": {"rim_mm": evaluation.rim_mm},
        "errors": [{"case": error.case_id, "output": error.output, "error": error.error}
                   for error in evaluation.errors],
        "skipped": [{"case": item.case_id, "reason": item.reason} for item in evaluation.skipped],
        "files": {"table": CSV_NAME, "plot": PLOT_NAME},
    }


def write_results(exp_dir: str | Path, evaluation: Evaluation, plot: bool = True) -> dict[str, Path]:
    """Write the CSV, the summary and (``plot``) the PNG into ``exp_dir``; returns ``{kind: path}``."""
    exp_dir = Path(exp_dir)
    written = {"table": write_text_atomic(exp_dir / CSV_NAME, csv_text(evaluation.lesions)),
               "summary": write_json_atomic(exp_dir / SUMMARY_NAME, summary(evaluation))}
    if plot:
        written["plot"] = plot_quality(evaluation.lesions, evaluation.tolerances, exp_dir / PLOT_NAME)
    written.update(write_fidelity(exp_dir, evaluation.lesions, plot=plot))
    written["review"] = write_review(exp_dir, evaluation, written.get("fidelity_plot"))
    return written
