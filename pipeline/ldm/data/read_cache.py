"""An in-process cache of decoded volumes, so that one inference run reading the same NIfTI file several times (the
preflight checks, then each stage, then the quality gate) decodes its gzip stream once. Off unless :func:`enable`d
(``test.py`` and ``synthesize.py`` do, for the length of their run: :func:`enabled`; training reads each file once
per epoch and keeps its memory).

An entry is keyed by the path as given, the file's inode, size and modification time (an atomic rewrite gets a new
inode) and the requested dtype; every read returns its own copy of the array and of the geometry, so callers may
change what they get. At most ``limit`` bytes of arrays are kept, the least recently read dropped first.
"""
from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import replace

import numpy as np

DEFAULT_LIMIT = 2 * 2**30
_entries: OrderedDict = OrderedDict()
_lock = threading.Lock()
_limit = 0  # bytes; 0: off


def enable(limit: int = DEFAULT_LIMIT) -> None:
    """Cache decoded volumes in this process, at most ``limit`` bytes of arrays (0 turns the cache off)."""
    global _limit
    with _lock:
        _limit = int(limit)
        _trim()


@contextmanager
def enabled(limit: int = DEFAULT_LIMIT):
    """The cache on (at most ``limit`` bytes) for the block; afterwards the previous limit, and the volumes cached
    in the block forgotten."""
    previous = _limit
    enable(limit)
    try:
        yield
    finally:
        with _lock:
            _entries.clear()
        enable(previous)


def _trim() -> None:
    while _entries and sum(entry[0].nbytes for entry in _entries.values()) > _limit:
        _entries.popitem(last=False)


def _key(path, dtype) -> tuple | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None  # the reader raises its own error naming the file
    return str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, np.dtype(dtype).str


def _copy(array: np.ndarray, geometry):
    return array.copy(), replace(geometry, affine=geometry.affine.copy(), header=geometry.header.copy())


def _store(key: tuple, array: np.ndarray, geometry) -> None:
    with _lock:
        if array.nbytes <= _limit:
            _entries[key] = (array, geometry)
            _trim()


def file_cached(read):
    """Wrap ``read(path, dtype) -> (array, geometry)`` with the cache."""

    @functools.wraps(read)
    def cached(path, dtype=np.float32):
        key = _key(path, dtype) if _limit else None
        if key is None:
            return read(path, dtype)
        with _lock:
            hit = _entries.get(key)
            if hit is not None:
                _entries.move_to_end(key)
        if hit is not None:
            return _copy(*hit)
        array, geometry = read(path, dtype)
        _store(key, array, geometry)
        return _copy(array, geometry)

    return cached


def cached_count() -> int:
    """How many volumes the cache holds."""
    with _lock:
        return len(_entries)
