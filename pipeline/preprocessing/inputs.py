"""The cases of a run: one per CT of the file list, with its attribute line and optional segmentation.

List files follow the project's rule (:mod:`ldm.data.lists`): one path per line, blank lines skipped, relative
entries resolved against the list file's directory. The attribute file must have one non-blank line per CT and a
``--seg-list`` one segmentation per CT; otherwise the run stops before any work with an error naming the first
case left without its line. A bad line (malformed JSON, unknown organ ...) fails only its own case.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ldm.data.lists import read_list
from ldm.errors import DataError
from preprocessing.user_attributes import read_attribute_lines

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class CaseInput:
    """One row of the input lists. ``index`` is the 0-based row; ``where`` names the attribute line for messages."""

    index: int
    case_id: str
    ct_path: str
    attributes_line: str
    where: str
    seg_path: str | None = None


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _UNSAFE.sub("_", name).strip("._") or "case"


def case_ids(ct_paths: list[str]) -> list[str]:
    """Unique folder names per row: the file stem; ``<parent>_<stem>`` when stems repeat; ``<stem>-<row>`` if still equal."""
    stems = [_stem(path) for path in ct_paths]
    repeated = Counter(stems)
    with_parent = [f"{_UNSAFE.sub('_', Path(path).parent.name) or 'root'}_{stem}" if repeated[stem] > 1 else stem
                   for path, stem in zip(ct_paths, stems)]
    repeated = Counter(with_parent)
    return [f"{stem}-{row + 1}" if repeated[name] > 1 else name
            for row, (stem, name) in enumerate(zip(stems, with_parent))]


def _check_lengths(ct_paths: list[str], other: list, other_file: str | os.PathLike, what: str, filelist: str) -> None:
    if len(other) == len(ct_paths):
        return
    if len(other) < len(ct_paths):
        row = len(other)
        raise DataError(f"{other_file} has {len(other)} {what} but {filelist} has {len(ct_paths)} CTs: case "
                        f"{row + 1} ({ct_paths[row]}) has no {what[:-1]}; give one line per CT, in the same order")
    raise DataError(f"{other_file} has {len(other)} {what} but {filelist} has only {len(ct_paths)} CTs: "
                    f"give one line per CT, in the same order")


def read_cases(filelist: str | os.PathLike, attributes_file: str | os.PathLike,
               seg_list: str | os.PathLike | None = None) -> list[CaseInput]:
    """The cases of a run, in the order of ``filelist``; DataError when the lists cannot be aligned."""
    ct_paths = read_list(filelist)
    if not ct_paths:
        raise DataError(f"{filelist}: the file list holds no CT path")
    attribute_lines = read_attribute_lines(attributes_file)
    _check_lengths(ct_paths, attribute_lines, attributes_file, "attribute lines", str(filelist))
    seg_paths: list[str | None] = [None] * len(ct_paths)
    if seg_list is not None:
        seg_paths = list(read_list(seg_list))
        _check_lengths(ct_paths, seg_paths, seg_list, "segmentations", str(filelist))
    return [
        CaseInput(index=row, case_id=case_id, ct_path=ct_path, attributes_line=line,
                  where=f"{attributes_file} line {number}", seg_path=seg_path)
        for row, (case_id, ct_path, (number, line), seg_path)
        in enumerate(zip(case_ids(ct_paths), ct_paths, attribute_lines, seg_paths))
    ]
