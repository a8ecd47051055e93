"""Atomic file writes: readers never see a half-written output, and a failed write leaves nothing behind."""
from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ldm.errors import ConfigError

MULTI_SUFFIXES = (".nii.gz", ".tar.gz")


def temporary_sibling(path: Path) -> Path:
    """A hidden sibling of ``path``, unique per process and thread, with the same (possibly double) suffix so
    libraries that choose a format by name (nibabel: ``.nii.gz`` -> gzip) write the same format."""
    suffix = next((s for s in MULTI_SUFFIXES if path.name.endswith(s)), path.suffix)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return path.with_name(f".{stem}.tmp{os.getpid()}-{threading.get_ident()}{suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``path`` in one rename, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, value: Any, indent: int = 2) -> Path:
    """Write ``value`` as JSON (UTF-8, trailing newline) to ``path`` atomically; returns ``path``."""
    return write_text_atomic(path, json.dumps(value, indent=indent, default=str) + "\n")


def check_output_folder(path: str | os.PathLike, what: str) -> Path:
    """``path``, checked to be a folder this process can write into (it may not exist yet: then the nearest
    existing folder above it must be writable); ConfigError naming ``what`` (the flag) otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path}: exists and is not a folder; give a folder (it is created when absent)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path}: {existing} is a file, so the folder cannot be created there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {existing} is not writable")
    return path


def move_aside(path: str | os.PathLike, folder: str) -> Path:
    """Move ``path`` into the sub-folder ``folder`` next to it (for inspection; nothing is deleted); an earlier file
    of that name there is kept (``name~2``, ``name~3``...). Returns the new path."""
    path = Path(path)
    target = path.parent / folder / path.name
    stem = path.name.split(".", 1)[0]
    number = 2
    while target.exists():
        target = target.with_name(f"{stem}~{number}{path.name[len(stem):]}")
        number += 1
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    return target
