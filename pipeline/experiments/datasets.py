"""The experiment side of an nnU-Net export: which synthetic cases go in, the leak-free folds, and the paired
real-only baseline dataset.

- ``--synthetic-per-real F``: with folds, each fold trains on ``round(F * its real training cases)`` synthetic
  cases (:mod:`experiments.splits`); without, ``round(F * real cases)`` are kept. Both take them in one seeded
  order balanced over lesion types (:mod:`experiments.sampling`); the lesion type of a synthetic case is the
  organ its report names (the organ names of its keys, joined with ``+`` when there are several). Synthetic
  cases no fold uses are not exported.
- ``--with-baseline ID``: ``Dataset<ID>_<Name>Real`` holds the same real cases, byte for byte (copied from the
  augmented dataset), with the same folds minus the synthetic cases, so the two models are compared case by
  case on the same validation cases.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from experiments.sampling import balanced_order
from experiments.splits import SplitCase, Splits, build_splits, check_folds, check_ratio
from ldm.data.attributes import read_report
from ldm.data.organs import organ_name
from ldm.errors import ConfigError, DataError
from ldm.fileio import atomic_path, write_json_atomic
from quality import nnunet

BASELINE_SUFFIX = "Real"


def lesion_type(report_path: str | os.PathLike) -> str:
    """The organ(s) a ``type.json`` report names, e.g. ``liver`` or ``lung lower lobe left+lung upper lobe left``."""
    return "+".join(sorted({organ_name(key) for key in read_report(report_path)}))


def check_options(include_real: bool, folds: int | None, synthetic_per_real: float | None,
                  with_baseline: int | None, dataset_id: int, name: str) -> str | None:
    """ConfigError for experiment options that cannot work together; returns the baseline's folder name."""
    if folds is not None:
        check_folds(folds)
    check_ratio(synthetic_per_real)
    needs_real = [flag for flag, value in (("--folds", folds), ("--synthetic-per-real", synthetic_per_real),
                                           ("--with-baseline", with_baseline)) if value is not None]
    if needs_real and not include_real:
        raise ConfigError(f"{needs_real[0]}: needs real cases; pass --include-real IMAGES_LIST LABELS_LIST")
    if with_baseline is None:
        return None
    if with_baseline == dataset_id:
        raise ConfigError(f"--with-baseline {with_baseline}: must differ from --dataset-id")
    return nnunet.dataset_folder_name(with_baseline, name + BASELINE_SUFFIX)


def choose_synthetic(cases: Sequence[SplitCase], folds: int | None, seed: int, group_by: str | None,
                     synthetic_per_real: float | None) -> tuple[Splits | None, set[str], list[str]]:
    """``(splits or None, synthetic identifiers to export, notes)`` for the exported cases."""
    synthetic = [case for case in cases if case.kind == "synthetic"]
    splits, notes = None, []
    if folds is not None:
        splits = build_splits(list(cases), folds, seed, group_by, synthetic_per_real)
        kept, notes = splits.synthetic_used, list(splits.notes)
    elif synthetic_per_real is None:
        kept = {case.identifier for case in synthetic}
    else:
        wanted = int(round(synthetic_per_real * sum(case.kind == "real" for case in cases)))
        kept = {case.identifier for case in balanced_order(synthetic, seed)[:wanted]}
        if len(kept) < wanted:
            notes.append(f"{len(kept)} synthetic case(s) instead of {wanted}: only {len(synthetic)} exported")
    if len(kept) < len(synthetic):
        notes.append(f"{len(synthetic) - len(kept)} synthetic case(s) that no training uses are left out")
    return splits, kept, notes


def write_baseline(augmented_dir: Path, baseline_dir: Path, real: Sequence[str], labels: dict[str, int],
                   name: str, provenance: dict[str, Any]) -> Path:
    """``baseline_dir``: the ``real`` cases of ``augmented_dir`` copied and its ``dataset.json``, checked by
    reading it back. Returns the folder; DataError when no real case was exported."""
    if not real:
        raise DataError(f"{baseline_dir}: no real case could be exported, so there is no baseline to write")
    for folder in ("imagesTr", "labelsTr"):
        target = baseline_dir / folder
        target.mkdir(parents=True, exist_ok=True)
        wanted = {nnunet.image_name(i) if folder == "imagesTr" else nnunet.label_name(i) for i in real}
        for stale in (path for path in target.iterdir() if path.name not in wanted):
            stale.unlink()
        for file_name in sorted(wanted):
            with atomic_path(target / file_name) as temporary:
                shutil.copyfile(augmented_dir / folder / file_name, temporary)
    baseline_labels = {key: value for key, value in labels.items() if key != nnunet.IGNORE}
    write_json_atomic(baseline_dir / "dataset.json", nnunet.dataset_json(
        name, baseline_labels, len(real), {**provenance, "synthetic_cases": 0, "ignored_lesions": 0,
                                           "paired_with": augmented_dir.name}))
    nnunet.verify_dataset(baseline_dir, real)
    return baseline_dir
