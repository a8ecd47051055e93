"""List files: one path per line, the N-th line of every list describes the same case.

Format (as the original ``read_file_list``): lines are stripped and blank lines dropped. ``~`` is expanded.

Path rule (a deliberate change): a relative entry is resolved against the **directory of the list file**, not
against the current directory as the original did (it ran from ``pipeline/``). A list thus stays valid wherever
the command runs and wherever the case folder is moved together with its lists. The original demo lists
(``../demo/Liver_cancer/...`` stored in ``demo/``) resolve to the same files under both rules.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from ldm.errors import DataError


def list_lines(list_path: str | os.PathLike) -> tuple[list[str], Path]:
    """``(entries, folder)`` of a list file: its stripped non-blank lines in file order, and the absolute folder
    of the list that relative entries resolve against; DataError when it is missing or unreadable."""
    list_path = Path(os.path.expanduser(str(list_path)))
    if not list_path.is_file():
        raise DataError(f"{list_path}: list file not found")
    try:
        lines = list_path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{list_path}: cannot read the list file ({error})") from None
    return [line.strip() for line in lines if line.strip()], list_path.resolve().parent


def read_list(list_path: str | os.PathLike) -> list[str]:
    """Read a list file; returns its entries as absolute path strings, in file order."""
    entries, base = list_lines(list_path)
    paths = [Path(os.path.expanduser(entry)) for entry in entries]
    return [str(path if path.is_absolute() else (base / path).resolve()) for path in paths]


def read_aligned_lists(list_paths: Mapping[str, str | os.PathLike | None]) -> dict[str, list[str]]:
    """Read several list files that must describe the same cases line by line.

    ``list_paths`` maps a name (e.g. ``"image_list"``) to a list file or ``None`` (absent, skipped). Returns
    ``{name: entries}`` for the given lists. Raises DataError when a list is missing or when two lists have
    different lengths (the message names both files and both lengths).
    """
    lists = {name: (Path(path), read_list(path)) for name, path in list_paths.items() if path}
    named = list(lists.items())
    for (first_name, (first_path, first)), (other_name, (other_path, other)) in zip(named, named[1:]):
        if len(first) != len(other):
            raise DataError(
                f"{first_name} {first_path} has {len(first)} entries but {other_name} {other_path} has "
                f"{len(other)}: every list must have one line per case, in the same order"
            )
    return {name: entries for name, (_, entries) in lists.items()}
