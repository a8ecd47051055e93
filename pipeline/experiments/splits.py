"""Cross-validation folds for an nnU-Net dataset of real and synthetic cases that cannot leak.

nnU-Net's default split is a random 5-fold split over *all* cases of a dataset. With synthetic cases in it, the
Dice it reports is partly measured on synthetic output, and several synthetic copies of one CT can sit on both
sides of a fold. :func:`build_splits` instead:

1. makes ``folds`` folds over the **real** cases only (seeded). Real cases that share a CT or a patient id form
   one group and always share a fold; groups are shuffled with the seed and each goes to the fold holding the
   fewest cases so far (so the folds differ by at most the size of one group);
2. puts every synthetic case on the training side of every fold, **except** the folds whose validation holds a
   real case it shares a key with: its source CT (the CT its lesions were pasted into: the ``source_ct`` that
   ``preprocess.py`` recorded in ``<case>/preprocess.json``, see :func:`inference.cases.recorded_source`, else
   the CT in ``img_list.txt``) or its patient id;
3. with ``synthetic_per_real = F``, keeps for each fold only ``round(F * real training cases)`` of the allowed
   synthetic cases, taken in one seeded order balanced over lesion types (:mod:`experiments.sampling`).

Patient ids come from ``--group-by REGEX``: searched in each CT's path (folders and file name, ``/``-separated);
the first group when the pattern has one, else the whole match. A CT the pattern does not match is its own
patient. The result is nnU-Net's ``splits_final.json`` format: a list of ``{"train": [...], "val": [...]}``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.sampling import balanced_order
from ldm.errors import ConfigError
from ldm.fileio import write_json_atomic

SPLITS_FILE = "splits_final.json"
PREPROCESSED_ENV = "nnUNet_preprocessed"
KINDS = ("real", "synthetic")


@dataclass(frozen=True)
class SplitCase:
    """A case of the dataset as the split sees it: identifier, ``real`` or ``synthetic``, the CT it was made from
    (``origin``) and, for synthetic cases, the lesion type its report names."""

    identifier: str
    kind: str
    origin: str
    lesion_type: str = ""


@dataclass
class Splits:
    """The folds (``splits_final.json`` content), the synthetic cases any fold trains on, and notes for the user."""

    folds: list[dict[str, list[str]]]
    synthetic_used: set[str]
    notes: list[str]


def compile_group_by(pattern: str | None) -> re.Pattern | None:
    """The ``--group-by`` pattern compiled; ConfigError naming it when it is not a valid regular expression."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"--group-by {pattern!r}: not a regular expression ({error})") from None


def patient_id(path: str, pattern: re.Pattern | None) -> str | None:
    """The patient id ``pattern`` finds in ``path`` (first group, else the match), or None."""
    match = pattern.search(Path(path).as_posix()) if pattern is not None else None
    if match is None:
        return None
    return match.group(1) if pattern.groups else match.group(0)


def case_keys(case: SplitCase, pattern: re.Pattern | None) -> set[str]:
    """What ties a case to others: its CT (resolved path) and, when found, its patient id."""
    keys = {f"ct:{Path(case.origin).resolve()}"}
    patient = patient_id(case.origin, pattern)
    if patient is not None:
        keys.add(f"patient:{patient}")
    return keys


def _groups(real: list[SplitCase], pattern: re.Pattern | None) -> list[list[SplitCase]]:
    """Real cases joined when they share a key (union-find), each group in input order, groups by first case."""
    parent = list(range(len(real)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    owner: dict[str, int] = {}
    for index, case in enumerate(real):
        for key in sorted(case_keys(case, pattern)):
            if key in owner:
                parent[root(index)] = root(owner[key])
            else:
                owner[key] = index
    grouped: dict[int, list[SplitCase]] = {}
    for index, case in enumerate(real):
        grouped.setdefault(root(index), []).append(case)
    return list(grouped.values())


def check_folds(folds) -> None:
    """ConfigError unless ``folds`` is an integer >= 2."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"--folds: must be an integer >= 2, got {folds!r}")


def check_ratio(synthetic_per_real) -> None:
    """ConfigError unless ``synthetic_per_real`` is None or a number >= 0."""
    if synthetic_per_real is not None and (isinstance(synthetic_per_real, bool) or not isinstance(
            synthetic_per_real, (int, float)) or not synthetic_per_real >= 0):
        raise ConfigError(f"--synthetic-per-real: must be a number >= 0, got {synthetic_per_real!r}")


def real_folds(real: list[SplitCase], folds: int, seed: int, pattern: re.Pattern | None) -> list[list[SplitCase]]:
    """The real cases of each validation fold (module docstring, step 1); ConfigError when there are fewer
    independent groups than folds."""
    check_folds(folds)
    groups = _groups(sorted(real, key=lambda case: case.identifier), pattern)
    if len(groups) < folds:
        raise ConfigError(f"--folds {folds}: only {len(groups)} independent real case(s) (distinct CTs and "
                          f"patients) to validate on; give more real cases or fewer folds")
    order = np.random.default_rng(seed).permutation(len(groups))
    shuffled = sorted((groups[i] for i in order), key=len, reverse=True)  # stable: ties keep the seeded order
    assigned: list[list[SplitCase]] = [[] for _ in range(folds)]
    for group in shuffled:
        min(assigned, key=len).extend(group)
    return assigned


def build_splits(cases: list[SplitCase], folds: int = 5, seed: int = 0, group_by: str | None = None,
                 synthetic_per_real: float | None = None) -> Splits:
    """Leak-free folds over ``cases`` (module docstring); ConfigError for bad options or no real case."""
    unknown = sorted({case.kind for case in cases} - set(KINDS))
    if unknown:
        raise ConfigError(f"split: unknown case kind {unknown[0]!r}")
    check_ratio(synthetic_per_real)
    pattern = compile_group_by(group_by)
    real = [case for case in cases if case.kind == "real"]
    synthetic = [case for case in cases if case.kind == "synthetic"]
    if not real:
        raise ConfigError("--folds: the folds are made over real cases; pass --include-real IMAGES_LIST LABELS_LIST")
    validation = real_folds(real, folds, seed, pattern)
    order = balanced_order(synthetic, seed)
    synthetic_keys = {case.identifier: case_keys(case, pattern) for case in synthetic}
    result = Splits([], set(), [])
    for number, val_cases in enumerate(validation):
        held_out = set().union(*(case_keys(case, pattern) for case in val_cases))
        allowed = [case for case in order if not synthetic_keys[case.identifier] & held_out]
        validated = {case.identifier for case in val_cases}
        train_real = [case for case in real if case.identifier not in validated]
        chosen = allowed
        if synthetic_per_real is not None:
            wanted = int(round(synthetic_per_real * len(train_real)))
            chosen = allowed[:wanted]
            if len(chosen) < wanted:
                result.notes.append(f"fold {number}: {len(chosen)} synthetic case(s) instead of {wanted} "
                                    f"(only {len(allowed)} made from CTs outside its validation)")
        result.synthetic_used.update(case.identifier for case in chosen)
        result.folds.append({"train": sorted(case.identifier for case in train_real + chosen),
                             "val": sorted(case.identifier for case in val_cases)})
    if pattern is not None:
        unmatched = [case.origin for case in real + synthetic if patient_id(case.origin, pattern) is None]
        if unmatched:
            result.notes.append(f"--group-by: {len(unmatched)} CT(s) without a patient id (each its own patient), "
                                f"e.g. {unmatched[0]}")
    return result


def real_only(folds: list[dict[str, list[str]]], real_identifiers: set[str]) -> list[dict[str, list[str]]]:
    """The same folds restricted to the real cases (the paired baseline's split)."""
    return [{side: [name for name in fold[side] if name in real_identifiers] for side in ("train", "val")}
            for fold in folds]


def place_splits(folds: list[dict[str, list[str]]], dataset_dir: Path) -> tuple[Path, Path | None]:
    """Write ``splits_final.json`` into the raw dataset folder (``nnUNetv2_plan_and_preprocess`` copies it from
    there) and, when ``$nnUNet_preprocessed`` is set, into ``$nnUNet_preprocessed/<dataset>/`` where
    ``nnUNetv2_train`` reads it (replacing an older one, which would otherwise stop the planner). Returns both
    paths (the second None when the variable is not set)."""
    raw = write_json_atomic(dataset_dir / SPLITS_FILE, folds)
    preprocessed = os.environ.get(PREPROCESSED_ENV)
    if not preprocessed:
        return raw, None
    return raw, write_json_atomic(Path(preprocessed) / dataset_dir.name / SPLITS_FILE, folds)
