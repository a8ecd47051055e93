"""What ``compare_segmentation.py`` writes: the console table, ``<stem>.json``, ``<stem>.csv`` (the summary
rows), ``<stem>_cases.csv`` (one row per case) and ``<stem>.png`` (per-case Dice, baseline against augmented).
Every file is written atomically."""
from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments.compare import MODELS, Comparison
from experiments.lesions import SIZE_BINS
from ldm.fileio import write_json_atomic, write_text_atomic
from ldm.previews import save_figure

SUMMARY_FIELDS = ("metric", "baseline", "augmented", "difference", "ci_low", "ci_high", "lesions")
PNG_DPI = 110


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_table(comparison: Comparison) -> str:
    """The summary as an aligned text table, with the number of cases and the lesion-matching rule."""
    header = ("metric", "baseline", "augmented", "difference", "95% CI", "lesions")
    rows = [(row["metric"], _number(row["baseline"]), _number(row["augmented"]), _number(row["difference"]),
             f"[{_number(row['ci_low'])}, {_number(row['ci_high'])}]",
             "" if row["lesions"] is None else str(row["lesions"]))
            for row in comparison.summary]
    widths = [max(len(str(line[i])) for line in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in [header, *rows]]
    options = comparison.options
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"{len(comparison.cases)} case(s); lesion label {options['lesion_label']}; a reference lesion is "
                 f"found when predicted voxels cover >= {options['min_overlap']:.0%} of it; difference = augmented "
                 f"- baseline, paired bootstrap over cases ({options['bootstrap']} draws, seed {options['seed']})")
    return "\n".join(lines)


def _csv(rows: list[dict], fields) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def case_rows(comparison: Comparison) -> list[dict]:
    """One flat row per case: Dice, lesions, found and false positives per model, overall and per size bin."""
    rows = []
    for case in comparison.cases:
        row = {"case": case.case, "lesions": sum(case.baseline.lesions.values())}
        for model in MODELS:
            score = getattr(case, model)
            row.update({f"dice_{model}": round(score.dice, 4), f"found_{model}": sum(score.found.values()),
                        f"fp_{model}": sum(score.false_positives.values())})
            for size in SIZE_BINS:
                row.update({f"found_{model} {size}": score.found[size],
                            f"fp_{model} {size}": score.false_positives[size]})
        row.update({f"lesions {size}": case.baseline.lesions[size] for size in SIZE_BINS})
        rows.append(row)
    return rows


def plot_dice(comparison: Comparison, path: Path) -> Path:
    """``path``: per-case Dice of the augmented model against the baseline's, with the identity line."""
    figure = Figure(figsize=(5, 5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    base = [case.baseline.dice for case in comparison.cases]
    aug = [case.augmented.dice for case in comparison.cases]
    axes.plot([0, 1], [0, 1], color="0.4", linestyle="--", linewidth=1, label="equal")
    axes.scatter(base, aug, color="#2166ac", s=24, label="case")
    axes.set_xlim(-0.02, 1.02)
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("Dice, baseline (real only)")
    axes.set_ylabel("Dice, augmented (real + synthetic)")
    axes.set_title(f"Lesion Dice per case ({len(base)} cases)", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path, PNG_DPI)


def write_report(comparison: Comparison, json_path: str | Path) -> dict[str, Path]:
    """Write the JSON at ``json_path`` and the CSVs and PNG beside it; returns ``{kind: path}``."""
    json_path = Path(json_path)
    stem = json_path.with_suffix("") if json_path.suffix == ".json" else json_path
    paths = {"json": json_path, "csv": stem.with_name(stem.name + ".csv"),
             "cases_csv": stem.with_name(stem.name + "_cases.csv"), "png": stem.with_name(stem.name + ".png")}
    errors = [{"case": case, "reason": reason} for case, reason in comparison.errors]
    write_json_atomic(paths["json"], {"options": comparison.options, "summary": comparison.summary,
                                      "cases": [asdict(case) for case in comparison.cases], "errors": errors})
    write_text_atomic(paths["csv"], _csv(comparison.summary, SUMMARY_FIELDS))
    rows = case_rows(comparison)
    write_text_atomic(paths["cases_csv"], _csv(rows, rows[0].keys() if rows else ("case",)))
    plot_dice(comparison, paths["png"])
    return paths
