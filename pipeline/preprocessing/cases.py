"""All cases of a run: parallel workers, the aligned output lists and ``preprocess_report.json``.

Cases run in a thread pool (``workers``); numpy/scipy, file I/O and LLM calls release the GIL, and all cases
share one LLM client. TotalSegmentator is heavy (a GPU or several CPU cores and GBs of memory per run), so at
most ``segmentation_workers`` segmentations run at a time (default 1) whatever ``workers`` is. Under torchrun or
srun the cases are shared out over the processes (:func:`preprocess`).

``exp/{img,seg,type,bbox}_list.txt`` hold, row by row in the order of the input list, the outputs of the cases
that succeeded (done now or skipped as already done); paths are relative to ``exp/`` (list entries resolve
against their list's directory), so the folder can be moved as a whole.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ldm.fileio import write_json_atomic, write_text_atomic
from ldm.distributed import Launch, gather_to_main, process_group, shard

from preprocessing.case import OUTPUT_FILES, CaseResult, PreprocessOptions, process_case
from preprocessing.case_run import run_in_threads
from preprocessing.inputs import CaseInput

REPORT_FILE = "preprocess_report.json"
LIST_FILES = {name: f"{name}_list.txt" for name in OUTPUT_FILES}
SUCCEEDED = ("done", "skipped")


def run_cases(cases: list[CaseInput], exp_dir: Path, options: PreprocessOptions, reporter: Any,
              workers: int = 1, segmentation_workers: int = 1, progress: bool = True) -> list[CaseResult]:
    """Process every case; returns the results in input order (failures included, never raised)."""
    return run_in_threads(cases, lambda case, slots: process_case(case, exp_dir, options, reporter, slots), workers,
                          segmentation_workers, "preprocess", progress)


def write_lists(exp_dir: Path, results: list[CaseResult]) -> dict[str, Path]:
    """Write the four aligned lists (successful cases, input order); returns ``{name: list path}``."""
    written = {}
    for name, list_name in LIST_FILES.items():
        rows = [f"{result.case_id}/{OUTPUT_FILES[name]}" for result in results if result.status in SUCCEEDED]
        write_text_atomic(exp_dir / list_name, "".join(f"{row}\n" for row in rows))
        written[name] = exp_dir / list_name
    return written


def write_run_report(exp_dir: Path, results: list[CaseResult], options: PreprocessOptions,
                     reporter_settings: dict[str, Any], seconds: float) -> Path:
    """Write ``preprocess_report.json``: options, a summary and, per case, inputs, outputs, steps, seconds, error."""
    summary = {status: sum(result.status == status for result in results) for status in ("done", "skipped", "failed")}
    report = {
        "options": {**asdict(options), "reporter": reporter_settings},
        "summary": {**summary, "cases": len(results), "seconds": round(seconds, 3)},
        "lists": {name: list_name for name, list_name in LIST_FILES.items()},
        "cases": [asdict(result) for result in results],
    }
    return write_json_atomic(exp_dir / REPORT_FILE, report)


def preprocess(cases: list[CaseInput], exp_dir: Path, options: PreprocessOptions, reporter: Any, workers: int = 1,
               segmentation_workers: int = 1, progress: bool = True, launch: Launch | None = None) -> list[CaseResult]:
    """Run all cases and write the lists and the run report into ``exp_dir``; returns the results in input order.

    Under torchrun or srun (``launch``, see :mod:`ldm.distributed`) each process runs the cases
    ``rank, rank + world, ...`` and returns their results; rank 0 gathers all and alone writes the lists and the
    report, which equal a single process's (a case's randomness depends on its row only)."""
    launch = launch or Launch()
    exp_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with process_group(launch):
        own = run_cases(shard(cases, launch), exp_dir, options, reporter, workers, segmentation_workers, progress)
        results = gather_to_main(launch, own)
    if not launch.is_main:
        return own
    results = sorted(results, key=lambda result: result.index)
    write_lists(exp_dir, results)
    write_run_report(exp_dir, results, options, reporter.settings, time.perf_counter() - start)
    return results
