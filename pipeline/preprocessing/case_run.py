"""How one case of a dataset command is run, shared by ``preprocess.py`` (:mod:`preprocessing.case`) and
``prepare_dataset.py`` (:mod:`preparation.case`): its result record, timed steps, the fingerprint that lets a rerun
skip a finished case, the capture of its error, and the thread pool running all cases.

A case is finished when its record file (written last, atomically) holds the expected fingerprint and every output
file exists. A bad case never stops the others: its error lands in its result (one line; the traceback only with
``--debug`` for our own errors, always for unexpected ones).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

from tqdm import tqdm

from ldm.errors import LesionDiffusionError

# Options that change how a run goes, never what a case writes: left out of the fingerprint.
RUN_ONLY_OPTIONS = ("overwrite", "debug", "seg_device")
Case = TypeVar("Case")
Result = TypeVar("Result", bound="CaseResult")


@dataclass
class CaseResult:
    """What happened to one case; ``status`` is ``done``, ``skipped`` or ``failed``; ``seconds`` per step."""

    index: int
    case_id: str
    inputs: dict[str, str | None]
    status: str = "failed"
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the block as step ``name`` (seconds, rounded to ms); a failing step records no time."""
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)


def fingerprint_fields(options: Any) -> dict[str, Any]:
    """The fields of an options dataclass that change a case's outputs (all but ``RUN_ONLY_OPTIONS``)."""
    fields = asdict(options)
    for key in RUN_ONLY_OPTIONS:
        fields.pop(key, None)
    return fields


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def content_hash(content: Mapping[str, Any]) -> str:
    """Hex SHA-256 of JSON-able ``content`` (keys sorted; other values by ``str``)."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def finished_record(case_dir: Path, record_file: str, output_files: Mapping[str, str],
                    fingerprint: str) -> dict[str, Any] | None:
    """The case's record when it holds ``fingerprint`` and every output file exists (the case is done), else None."""
    record = case_dir / record_file
    if not record.is_file() or not all((case_dir / name).is_file() for name in output_files.values()):
        return None
    try:
        content = json.loads(record.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return None
    return content if isinstance(content, dict) and content.get("fingerprint") == fingerprint else None


@contextlib.contextmanager
def errors_into(result: CaseResult, debug: bool) -> Iterator[None]:
    """Run the block; an error ends it and is kept in ``result`` (module docstring) instead of propagating."""
    try:
        yield
    except LesionDiffusionError as error:
        result.error = str(error)
        result.traceback = traceback.format_exc() if debug else None
    except Exception as error:  # noqa: BLE001 - one bad case must not stop the others; the reason is reported
        result.error = f"{type(error).__name__}: {error}"
        result.traceback = traceback.format_exc()


def run_in_threads(cases: Sequence[Case], run_case: Callable[[Case, threading.BoundedSemaphore], Result],
                   workers: int, segmentation_workers: int, description: str, progress: bool) -> list[Result]:
    """``run_case(case, segmentation slots)`` for every case on ``workers`` threads, at most
    ``segmentation_workers`` holding a slot at once; results sorted by case index, with a tqdm bar."""
    slots = threading.BoundedSemaphore(max(1, segmentation_workers))
    results: list[Result] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(run_case, case, slots) for case in cases]
        with tqdm(total=len(futures), desc=description, unit="case", disable=not progress) as bar:
            for future in as_completed(futures):
                result = future.result()
                results.append(result)
                bar.set_postfix_str(f"{result.case_id}: {result.status}")
                bar.update(1)
    return sorted(results, key=lambda result: result.index)
