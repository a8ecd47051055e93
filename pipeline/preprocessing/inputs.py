"""The cases of a run: one per CT of the file list, with its attribute line and optional segmentation.

List files: one path per line, blank lines skipped, ``~`` expanded. A relative line resolves against the list
file's folder (the project's rule, :mod:`ldm.data.lists`), and when no file is there, against the current directory
(the original code's convention, for lists written for it); a file found at neither place fails its case with an
error naming both paths tried. The attribute file must have one non-blank line per CT and a ``--seg-list`` one
segmentation per CT; otherwise the run stops before any work with an error naming the first case left without its
line. A bad line (malformed JSON, unknown organ ...) fails only its own case.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ldm.data.lists import list_lines
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
    ct_tried: tuple[str, ...] = ()
    seg_tried: tuple[str, ...] = ()


def resolve_entry(entry: str, list_dir: Path, cwd: Path) -> tuple[str, tuple[str, ...]]:
    """``(path, paths tried)`` of one list line (module docstring rule); ``path`` is the list-folder candidate
    when no candidate exists."""
    path = Path(os.path.expanduser(entry))
    if path.is_absolute():
        return str(path), (str(path),)
    candidates = tuple(dict.fromkeys(str((base / path).resolve()) for base in (list_dir, cwd)))
    found = next((candidate for candidate in candidates if Path(candidate).is_file()), candidates[0])
    return found, candidates


def read_input_list(list_path: str | os.PathLike) -> list[tuple[str, tuple[str, ...]]]:
    """``(path, paths tried)`` for every line of a list file, in file order; DataError when it cannot be read."""
    entries, list_dir = list_lines(list_path)
    cwd = Path.cwd()
    return [resolve_entry(entry, list_dir, cwd) for entry in entries]


def require_input(path: str, tried: tuple[str, ...], what: str) -> None:
    """DataError unless ``path`` is a file; names every path tried for a relative list line."""
    if Path(path).is_file():
        return
    if len(tried) > 1:
        raise DataError(f"{what} not found: tried {tried[0]} (relative to the list's folder) and {tried[1]} "
                        "(relative to the current directory)")
    raise DataError(f"{path}: file not found")


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
    ct_entries = read_input_list(filelist)
    ct_paths = [path for path, _ in ct_entries]
    if not ct_paths:
        raise DataError(f"{filelist}: the file list holds no CT path")
    attribute_lines = read_attribute_lines(attributes_file)
    _check_lengths(ct_paths, attribute_lines, attributes_file, "attribute lines", str(filelist))
    seg_entries: list[tuple[str | None, tuple[str, ...]]] = [(None, ())] * len(ct_paths)
    if seg_list is not None:
        seg_entries = list(read_input_list(seg_list))
        _check_lengths(ct_paths, seg_entries, seg_list, "segmentations", str(filelist))
    return [
        CaseInput(index=row, case_id=case_id, ct_path=ct_path, attributes_line=line,
                  where=f"{attributes_file} line {number}", seg_path=seg_path, ct_tried=ct_tried, seg_tried=seg_tried)
        for row, (case_id, (ct_path, ct_tried), (number, line), (seg_path, seg_tried))
        in enumerate(zip(case_ids(ct_paths), ct_entries, attribute_lines, seg_entries))
    ]
