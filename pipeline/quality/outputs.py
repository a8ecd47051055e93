"""Which inpainted CTs of an experiment folder are evaluated, and the inputs and lesion mask that belong to each.

A case is a row of the aligned lists ``img_list.txt`` (the input CT), ``seg_list.txt`` (organ segmentation),
``type_list.txt`` (report) and, when present, ``bbox_list.txt`` (the requested boxes) and the LINet run's label
list (``label_list.txt`` unless ``linet_report.json`` names another). Its outputs live in the case folder of
:func:`inference.cases.case_folders`.

Pairing an inpainted CT with its mask:

- ``which="latest"`` (default) with ``linet_report.json`` present: the output the last LINet run wrote for each
  case, with the label-list row that run read (cases it failed are listed as skipped with its reason);
- otherwise (``which="all"``, or no report): every ``inpainting_<k>.nii.gz`` of the case folder, with
  ``samples_<k>.nii.gz`` of the same ``k`` when it exists, else the label-list row. An older output made from
  another mask than its number suggests shows up as voxels changed outside the paste region.

Each lesion is one face-connected component of value 2 of that mask (as LINet inpainted them), largest first, so
lesion ``r`` of an output is LINet's lesion rank ``r``.

The file measured is the one on the grid the models ran on (the mask's): ``inpainting_<k>_std.nii.gz`` when LINet
also wrote the result on the user's own grid as ``inpainting_<k>.nii.gz`` (see :mod:`inference.linet`), else
``inpainting_<k>.nii.gz`` itself.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.data.lists import read_aligned_lists
from ldm.errors import ConfigError, DataError
from inference.cases import case_folders

REPORT_NAME = "linet_report.json"
LISTS = {"image": "img_list.txt", "seg": "seg_list.txt", "type": "type_list.txt"}
OPTIONAL_LISTS = {"boxes": "bbox_list.txt"}
DEFAULT_LABEL_LIST = "label_list.txt"
DEFAULT_RIM_MM = 2.0
WHICH = ("latest", "all")
_INPAINTING = re.compile(r"^inpainting_(\d+)(?:_std)?\.nii\.gz$")
STANDARDISED_SUFFIX = "_std"


@dataclass(frozen=True)
class OutputSpec:
    """One inpainted CT to evaluate: the case (row ``index``, ``case_id``) and the absolute paths it needs.

    ``boxes`` and ``seg`` may be None (no box grouping; no organ checks)."""

    index: int
    case_id: str
    image: Path
    report: Path
    mask: Path
    inpainted: Path
    seg: Path | None = None
    boxes: Path | None = None

    @property
    def number(self) -> int | None:
        """The ``k`` of ``inpainting_<k>.nii.gz`` (None for another name)."""
        match = _INPAINTING.match(self.inpainted.name)
        return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Skipped:
    """A case with nothing to evaluate, and why."""

    case_id: str
    reason: str


def read_linet_report(exp_dir: Path) -> dict[str, Any] | None:
    """The parsed ``linet_report.json`` of ``exp_dir``, or None when there is none; DataError when unreadable."""
    path = Path(exp_dir) / REPORT_NAME
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read the LINet run report ({error})") from None
    if not isinstance(report, dict) or not isinstance(report.get("cases", []), list):
        raise DataError(f"{path}: not a LINet run report (expected an object with 'options' and 'cases')")
    return report


def paste_rim(exp_dir: Path, rim_mm: float | None = None) -> float:
    """The blend rim of the paste in mm: ``rim_mm`` when given, else the LINet report's ``rim_mm`` option, else
    the inference default (2 mm)."""
    options = (read_linet_report(exp_dir) or {}).get("options") or {}
    value = rim_mm if rim_mm is not None else options.get("rim_mm", DEFAULT_RIM_MM)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"rim_mm: must be a number >= 0, got {value!r}")
    return float(value)


def standardised_output(path: Path) -> Path:
    """The file on the models' grid for an ``inpainting_<k>.nii.gz``: its ``_std`` sibling when there is one."""
    path = Path(path)
    if path.name.endswith(f"{STANDARDISED_SUFFIX}.nii.gz"):
        return path
    sibling = path.with_name(path.name[: -len(".nii.gz")] + f"{STANDARDISED_SUFFIX}.nii.gz")
    return sibling if sibling.is_file() else path


def _label_list_name(report: dict[str, Any] | None) -> str:
    lists = ((report or {}).get("options") or {}).get("lists") or {}
    return str(lists.get("label") or DEFAULT_LABEL_LIST)


def read_case_rows(exp_dir: Path, label_list_name: str = DEFAULT_LABEL_LIST) -> list[dict[str, Any]]:
    """One dict per case row: ``index``, ``case_id``, ``folder`` and the absolute input paths (``image``, ``seg``,
    ``type``, optional ``boxes`` and ``label``)."""
    exp_dir = Path(exp_dir)
    if exp_dir.exists() and not exp_dir.is_dir():
        raise DataError(f"{exp_dir}: the experiment folder is a file, not a folder")
    if not exp_dir.is_dir():
        raise DataError(f"{exp_dir}: experiment folder not found")
    names = dict(LISTS)
    names.update({kind: name for kind, name in OPTIONAL_LISTS.items() if (exp_dir / name).is_file()})
    if (exp_dir / label_list_name).is_file():
        names["label"] = label_list_name
    table = read_aligned_lists({kind: exp_dir / name for kind, name in names.items()})
    rows = [dict(zip(table, paths)) for paths in zip(*table.values())]
    folders = case_folders(exp_dir, [row["image"] for row in rows])
    return [{"index": index, "case_id": case_id, "folder": folder, **row}
            for index, (row, (case_id, folder)) in enumerate(zip(rows, folders))]


def _spec(row: dict[str, Any], inpainted: Path, mask: str | Path) -> OutputSpec:
    return OutputSpec(index=row["index"], case_id=row["case_id"], image=Path(row["image"]), report=Path(row["type"]),
                      mask=Path(mask), inpainted=Path(inpainted), seg=Path(row["seg"]) if row.get("seg") else None,
                      boxes=Path(row["boxes"]) if row.get("boxes") else None)


def numbered_outputs(folder: Path) -> list[tuple[int, Path]]:
    """``(k, path)`` of every ``inpainting_<k>.nii.gz`` in ``folder``, by ``k``."""
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), folder / name) for name in os.listdir(folder)
             if (match := _INPAINTING.match(name)) and STANDARDISED_SUFFIX not in name]
    return sorted(found)


def _all_outputs(rows: list[dict[str, Any]]) -> tuple[list[OutputSpec], list[Skipped]]:
    specs, skipped = [], []
    for row in rows:
        outputs = numbered_outputs(Path(row["folder"]))
        if not outputs:
            skipped.append(Skipped(row["case_id"], f"no inpainting_<k>.nii.gz in {row['folder']}"))
        for number, path in outputs:
            same_number = path.with_name(f"samples_{number}.nii.gz")
            mask = same_number if same_number.is_file() else row.get("label")
            if mask is None:
                skipped.append(Skipped(row["case_id"], f"{path.name}: no samples_{number}.nii.gz and no label list"))
            else:
                specs.append(_spec(row, standardised_output(path), mask))
    return specs, skipped


def _latest_outputs(rows: list[dict[str, Any]], report: dict[str, Any]) -> tuple[list[OutputSpec], list[Skipped]]:
    entries = {entry.get("case_id"): entry for entry in report.get("cases", []) if isinstance(entry, dict)}
    specs, skipped = [], []
    for row in rows:
        entry = entries.get(row["case_id"])
        outputs = (entry or {}).get("outputs") or {}
        image = outputs.get("standardised") or outputs.get("image")
        if entry is None:
            skipped.append(Skipped(row["case_id"], f"not in {REPORT_NAME} (LINet has not run on this case)"))
        elif outputs.get("rejected_image"):
            skipped.append(Skipped(row["case_id"], "output rejected by the quality gate (moved to rejected/)"))
        elif entry.get("status") != "done" or not image:
            skipped.append(Skipped(row["case_id"], f"LINet failed: {entry.get('error') or 'no output'}"))
        elif not row.get("label"):
            skipped.append(Skipped(row["case_id"], f"no label list: {_label_list_name(report)} is missing"))
        else:
            image = Path(image)
            # A moved experiment folder: the report's absolute path is gone, the file sits in the case folder.
            moved = Path(row["folder"]) / image.name
            specs.append(_spec(row, image if image.is_file() or not moved.is_file() else moved, row["label"]))
    return specs, skipped


def find_outputs(exp_dir: str | os.PathLike, which: str = "latest") -> tuple[list[OutputSpec], list[Skipped]]:
    """The outputs of ``exp_dir`` to evaluate and the cases skipped (module docstring rule)."""
    if which not in WHICH:
        raise ConfigError(f"which: {which!r} is not one of {', '.join(WHICH)}")
    exp_dir = Path(exp_dir)
    report = read_linet_report(exp_dir)
    rows = read_case_rows(exp_dir, _label_list_name(report))
    if which == "latest" and report is not None:
        return _latest_outputs(rows, report)
    return _all_outputs(rows)
