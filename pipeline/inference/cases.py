"""The cases of an experiment folder, where their outputs go, and the list files inference writes.

A case is one row of the aligned lists in ``exp_dir`` (``preprocess.py`` writes ``img_list.txt``,
``seg_list.txt``, ``type_list.txt`` and ``bbox_list.txt``; LMNet adds ``label_list.txt`` for LINet). Outputs go
to ``exp_dir/<case>/``: for a CT inside ``exp_dir`` (the ``preprocess.py`` layout) that is the CT's own folder;
for a CT elsewhere, a folder named after the CT's folder (inputs are never written to). Output files are numbered
``<stem>_<k>.nii.gz``: a new run takes the first unused ``k`` and so never replaces earlier results, unless
``overwrite`` is set, which rewrites ``k = 0``.

``preprocess.py`` records in ``<case>/preprocess.json`` the CT the user gave (``source_ct``) next to the
standardised ``ct.nii.gz``; LINet writes its results on that CT's grid (:func:`recorded_source`).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ldm.data.lists import read_aligned_lists
from ldm.errors import ConfigError, DataError
from ldm.fileio import write_text_atomic

PREPROCESS_RECORD = "preprocess.json"
LMNET_HINT = ("the LMNet stage failed for this case or has not been run: run test.py with "
              "configs/diffusion/maskdiffusion_test.yaml on this experiment first")


@dataclass(frozen=True)
class CaseSpec:
    """One case: ``index`` (row in the lists, 0-based; seeds derive from it), ``case_id`` (output folder name),
    ``paths`` (absolute input paths keyed ``image``, ``boxes``/``label``, ``type``, ``seg``) and ``out_dir``."""

    index: int
    case_id: str
    paths: dict[str, str]
    out_dir: Path


def require_exp_dir(exp_dir: Path | None) -> Path:
    """The experiment folder, checked to exist; ConfigError saying how to set it otherwise."""
    if exp_dir is None:
        raise ConfigError("no experiment folder: pass --exp DIR (the folder preprocess.py wrote) or set "
                          "inference.exp_dir")
    exp_dir = Path(exp_dir)
    if exp_dir.exists() and not exp_dir.is_dir():
        raise DataError(f"{exp_dir}: the experiment folder is a file (check --exp)")
    if not exp_dir.is_dir():
        raise DataError(f"{exp_dir}: experiment folder not found (run preprocess.py first, or check --exp)")
    return exp_dir


def case_folders(exp_dir: Path, images: list[str]) -> list[tuple[str, Path]]:
    """``(case_id, out_dir)`` for every CT path, in order (see the module docstring); ids are unique."""
    exp_dir = exp_dir.resolve()
    names = [Path(image).parent.name or Path(image).stem for image in images]
    repeated = {name for name, count in Counter(names).items() if count > 1}
    folders = []
    for row, (image, name) in enumerate(zip(images, names)):
        parent = Path(image).resolve().parent
        if parent.parent == exp_dir:
            folders.append((parent.name, parent))
            continue
        case_id = f"{name}_{row:03d}" if name in repeated else name
        folders.append((case_id, exp_dir / case_id))
    duplicated = [case_id for case_id, count in Counter(case_id for case_id, _ in folders).items() if count > 1]
    if duplicated:
        raise DataError(f"{exp_dir}: several list rows share the case folder {duplicated[0]!r}; every CT needs its "
                        "own folder")
    return folders


def read_cases(exp_dir: Path | None, lists: dict[str, str]) -> list[CaseSpec]:
    """All cases of ``exp_dir`` from the list files named in ``lists`` (``{kind: file name}``), in list order."""
    exp_dir = require_exp_dir(exp_dir)
    table = read_aligned_lists({kind: exp_dir / name for kind, name in lists.items()})
    rows = [dict(zip(table, paths)) for paths in zip(*table.values())]
    if not rows:
        raise DataError(f"{exp_dir / lists['image']}: the list holds no case")
    folders = case_folders(exp_dir, [row["image"] for row in rows])
    return [CaseSpec(index, case_id, row, out_dir) for index, (row, (case_id, out_dir)) in
            enumerate(zip(rows, folders))]


def output_path(out_dir: Path, stem: str, overwrite: bool, suffix: str = ".nii.gz") -> Path:
    """``out_dir/<stem>_<k><suffix>``: ``k = 0`` with ``overwrite``, else the first ``k`` not yet used."""
    if overwrite or not out_dir.is_dir():
        return out_dir / f"{stem}_0{suffix}"
    pattern = re.compile(rf"^{re.escape(stem)}_(\d+){re.escape(suffix)}$")
    used = {int(match.group(1)) for name in os.listdir(out_dir) if (match := pattern.match(name))}
    index = next(k for k in range(len(used) + 1) if k not in used)
    return out_dir / f"{stem}_{index}{suffix}"


def write_list(path: Path, entries: list[Path]) -> Path:
    """Write a list file (one entry per line, relative to the list's folder when inside it), atomically."""
    base = path.parent.resolve()
    lines = []
    for entry in entries:
        entry = Path(entry).resolve()
        lines.append(str(entry.relative_to(base)) if entry.is_relative_to(base) else str(entry))
    return write_text_atomic(path, "".join(f"{line}\n" for line in lines))


def recorded_source(image_path: str | os.PathLike) -> Path | None:
    """The user's CT that ``preprocess.py`` standardised into ``image_path`` (from the case's ``preprocess.json``),
    or None when the image was not made by ``preprocess.py`` (it is then the user's CT itself). DataError when
    the record is unreadable or the recorded CT is gone."""
    image_path = Path(image_path)
    record = image_path.parent / PREPROCESS_RECORD
    if not record.is_file():
        return None
    try:
        content = json.loads(record.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{record}: cannot read the preprocessing record ({error})") from None
    source = content.get("source_ct") if isinstance(content, dict) else None
    if not source or (content.get("outputs") or {}).get("img") != image_path.name:
        return None
    source = Path(source)
    if not source.is_file():
        raise DataError(f"{source}: the CT given to preprocess.py (recorded in {record}) is gone; the result is "
                        "written on that CT's grid, so restore it or run preprocess.py again")
    return source
