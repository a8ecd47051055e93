"""All cases of a dataset: parallel workers, then the lists, config fragments and run report (:mod:`.outputs`).

Cases run in a thread pool (``workers``): numpy/scipy, file I/O and LLM calls release the GIL. TotalSegmentator
takes a GPU or all CPU cores and GBs of memory, so at most ``segmentation_workers`` of its runs overlap.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from preparation.case import CaseResult, PrepareOptions, prepare_case
from preparation.outputs import split_cases, write_fragments, write_lists, write_run_report
from preparation.source import SourceDataset
from preprocessing.case_run import run_in_threads


def prepare_dataset(dataset: SourceDataset, out_dir: Path, options: PrepareOptions, reporter: Any,
                    val_fraction: float = 0.2, seed: int = 0, workers: int = 1, segmentation_workers: int = 1,
                    progress: bool = True) -> list[CaseResult]:
    """Prepare every case and write the lists, fragments and ``prepare_report.json`` into ``out_dir``; returns
    the results in case order (failures included, never raised)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    splits = split_cases([case.case_id for case in dataset.cases], val_fraction, seed)
    results = run_in_threads(
        dataset.cases, lambda case, slots: prepare_case(case, out_dir, options, reporter, slots, splits[case.case_id]),
        workers, segmentation_workers, "prepare", progress)
    rows = write_lists(out_dir, results)
    write_fragments(out_dir, rows)
    settings = {"reporter": reporter.settings, "val_fraction": val_fraction, "seed": seed}
    write_run_report(out_dir, str(dataset.root), results, options, settings, time.perf_counter() - start)
    return results
