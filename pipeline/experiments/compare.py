"""Baseline against augmented segmentation model, case by case, on the same reference labels.

A prediction folder is what ``nnUNetv2_predict`` writes (``<case>.nii.gz``) or an nnU-Net training output folder
whose ``fold_<k>/validation/`` folders hold the cross-validation predictions (all folds are gathered). The cases
compared are those of either prediction folder; each needs a prediction in both and a reference label
``LABELS/<case>.nii.gz`` on the same grid. Label values must be among those ``dataset.json`` declares (looked
for in ``LABELS`` and its parent, as nnU-Net lays out ``labelsTr``), else among the reference's own values. A
case failing any of this is reported with the reason and left out; the others are compared.

Per case, :func:`experiments.lesions.score_case` gives Dice and lesion-wise counts. Overall: mean Dice over cases,
sensitivity pooled over all reference lesions (found / lesions), false-positive lesions per case, and the last two
per size bin. The paired difference (augmented - baseline) of each gets a percentile bootstrap 95 % interval:
cases are drawn with replacement (the same draw for both models), ``bootstrap`` times, from ``seed``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from experiments.lesions import DEFAULT_MIN_OVERLAP, SIZE_BINS, CaseScore, score_case
from ldm.data.volume import read_label
from ldm.errors import ConfigError, DataError, LesionDiffusionError
from quality.measure import GRID_ATOL_MM

FILE_ENDING = ".nii.gz"
MODELS = ("baseline", "augmented")
DEFAULT_BOOTSTRAP = 2000


@dataclass
class CaseComparison:
    """One compared case: its name and the scores of both models."""

    case: str
    baseline: CaseScore
    augmented: CaseScore


@dataclass
class Comparison:
    """Compared cases, failed cases ``(case, reason)``, the summary rows and the options used."""

    cases: list[CaseComparison] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    options: dict = field(default_factory=dict)


def prediction_files(folder: str | os.PathLike) -> dict[str, Path]:
    """``{case: path}`` of a prediction folder (module docstring); DataError when it holds none or a case twice."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: prediction folder not found")
    direct = sorted(folder.glob(f"*{FILE_ENDING}"))
    paths = direct or sorted(folder.glob(f"fold_*/validation/*{FILE_ENDING}"))
    found: dict[str, Path] = {}
    for path in paths:
        case = path.name[: -len(FILE_ENDING)]
        if case in found:
            raise DataError(f"{folder}: case {case} is predicted twice ({found[case]} and {path})")
        found[case] = path
    if not found:
        raise DataError(f"{folder}: no <case>{FILE_ENDING} predictions (nor fold_<k>/validation/ folders)")
    return found


def declared_values(labels_dir: Path) -> set[int] | None:
    """The label values of the ``dataset.json`` beside ``labels_dir`` (or in it), or None when there is none."""
    for candidate in (labels_dir / "dataset.json", labels_dir.parent / "dataset.json"):
        if candidate.is_file():
            try:
                labels = json.loads(candidate.read_text()).get("labels") or {}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
                raise DataError(f"{candidate}: cannot read the declared labels ({error})") from None
            return {int(value) for value in labels.values() if isinstance(value, int)}
    return None


def _check_values(case: str, path: Path, values: set[int], allowed: set[int]) -> None:
    unexpected = sorted(values - allowed)
    if unexpected:
        raise DataError(f"{case}: {path}: label value(s) {unexpected} are not in the labels {sorted(allowed)}")


def _read_case(case: str, paths: dict[str, Path], lesion_label: int, declared: set[int] | None, min_overlap: float
               ) -> CaseComparison:
    """Score one case; DataError naming the case for a missing file, another grid or an unknown label value."""
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        raise DataError(f"{case}: missing from the {' and '.join(missing)} folder")
    reference, geometry = read_label(paths["labels"])
    reference_values = {int(v) for v in np.unique(reference)}
    allowed = declared if declared is not None else reference_values | {0, lesion_label}
    _check_values(case, paths["labels"], reference_values, allowed)
    scores = {}
    for model in MODELS:
        prediction, predicted_geometry = read_label(paths[model])
        if prediction.shape != reference.shape or not np.allclose(predicted_geometry.affine, geometry.affine,
                                                                  atol=GRID_ATOL_MM):
            raise DataError(f"{case}: {paths[model]}: its grid (shape {predicted_geometry.shape}) differs from the "
                            f"reference label {paths['labels']} (shape {geometry.shape})")
        _check_values(case, paths[model], {int(v) for v in np.unique(prediction)}, allowed)
        scores[model] = score_case(prediction == lesion_label, reference == lesion_label, geometry.spacing_zyx,
                                   min_overlap)
    return CaseComparison(case, scores["baseline"], scores["augmented"])


def _metrics(cases: list[CaseComparison], model: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per metric ``(numerators, denominators)`` over cases; the metric is ``sum(num) / sum(den)``."""
    scores = [getattr(case, model) for case in cases]
    ones = np.ones(len(scores))
    metrics = {"dice": (np.array([s.dice for s in scores]), ones),
               "sensitivity": (np.array([sum(s.found.values()) for s in scores], float),
                               np.array([sum(s.lesions.values()) for s in scores], float)),
               "fp_per_case": (np.array([sum(s.false_positives.values()) for s in scores], float), ones)}
    for size in SIZE_BINS:
        metrics[f"sensitivity {size}"] = (np.array([s.found[size] for s in scores], float),
                                          np.array([s.lesions[size] for s in scores], float))
        metrics[f"fp_per_case {size}"] = (np.array([s.false_positives[size] for s in scores], float), ones)
    return metrics


def _ratio(numerators: np.ndarray, denominators: np.ndarray) -> np.ndarray:
    """``sum(num) / sum(den)`` along the last axis; NaN where the denominators sum to 0."""
    top, bottom = numerators.sum(axis=-1), denominators.sum(axis=-1)
    return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1), np.nan)


def _defined(value) -> float | None:
    """``value`` as a float, None when it is undefined (NaN: no lesion to find)."""
    return None if not np.isfinite(value) else float(value)


def summarise(cases: list[CaseComparison], bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> list[dict]:
    """One row per metric: ``metric``, ``baseline``, ``augmented``, ``difference`` (augmented - baseline),
    ``ci_low``/``ci_high`` (paired bootstrap 95 %; None where undefined), ``lesions`` (reference lesions counted,
    for sensitivities)."""
    if not cases:
        return []
    baseline, augmented = _metrics(cases, "baseline"), _metrics(cases, "augmented")
    draws = np.random.default_rng(seed).integers(0, len(cases), size=(bootstrap, len(cases)))
    rows = []
    for metric in baseline:
        (base_num, base_den), (aug_num, aug_den) = baseline[metric], augmented[metric]
        base, aug = float(_ratio(base_num, base_den)), float(_ratio(aug_num, aug_den))
        differences = _ratio(aug_num[draws], aug_den[draws]) - _ratio(base_num[draws], base_den[draws])
        finite = differences[np.isfinite(differences)]
        low, high = (np.percentile(finite, [2.5, 97.5]) if finite.size else (np.nan, np.nan))
        rows.append({"metric": metric, "baseline": _defined(base), "augmented": _defined(aug),
                     "difference": _defined(aug - base), "ci_low": _defined(low), "ci_high": _defined(high),
                     "lesions": int(base_den.sum()) if metric.startswith("sensitivity") else None})
    return rows


def compare_predictions(baseline_dir: str | os.PathLike, augmented_dir: str | os.PathLike,
                        labels_dir: str | os.PathLike, lesion_label: int = 2,
                        min_overlap: float = DEFAULT_MIN_OVERLAP, bootstrap: int = DEFAULT_BOOTSTRAP,
                        seed: int = 0, progress=None) -> Comparison:
    """Compare two prediction folders on ``labels_dir`` (module docstring). Bad options raise ConfigError, an
    unusable folder DataError; a bad case is recorded in ``errors`` and the others are compared. ``progress``:
    an optional wrapper of the case iterable (such as ``tqdm``)."""
    if not 0.0 < min_overlap <= 1.0:
        raise ConfigError(f"--min-overlap: must lie in (0, 1], got {min_overlap!r}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 1:
        raise ConfigError(f"--bootstrap: must be a positive integer, got {bootstrap!r}")
    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise DataError(f"{labels_dir}: label folder not found")
    declared = declared_values(labels_dir)
    if declared is not None and lesion_label not in declared:
        raise ConfigError(f"--lesion-label {lesion_label}: not among the labels {sorted(declared)} declared for "
                          f"{labels_dir}")
    predictions = {"baseline": prediction_files(baseline_dir), "augmented": prediction_files(augmented_dir)}
    names = sorted(set(predictions["baseline"]) | set(predictions["augmented"]))
    result = Comparison(options={"baseline": str(baseline_dir), "augmented": str(augmented_dir),
                                 "labels": str(labels_dir), "lesion_label": lesion_label, "min_overlap": min_overlap,
                                 "bootstrap": bootstrap, "seed": seed})
    for case in (progress(names) if progress else names):
        label_path = labels_dir / f"{case}{FILE_ENDING}"
        paths = {"baseline": predictions["baseline"].get(case), "augmented": predictions["augmented"].get(case),
                 "labels": label_path if label_path.is_file() else None}
        try:
            result.cases.append(_read_case(case, paths, lesion_label, declared, min_overlap))
        except LesionDiffusionError as error:
            result.errors.append((case, str(error)))
    result.summary = summarise(result.cases, bootstrap, seed)
    return result
