"""Check every synthetic lesion of an experiment folder against its report: size, organ, HU, density, margin,
untouched background, components. Writes ``EXP_DIR/quality.csv`` (one row per lesion, pass/fail per check),
``EXP_DIR/quality_summary.json``, ``EXP_DIR/quality.png``, the per-attribute agreement ``EXP_DIR/fidelity.csv`` and
``fidelity.png`` (:mod:`quality.fidelity`) and the page to review the run, ``EXP_DIR/review.html``
(:mod:`quality.review`). The console ends with the fidelity table and names the weakest attributes.

    python pipeline/evaluate.py EXP_DIR [--tolerances quality.toml] [--hu-abs 50] [--disable extent] ...

Tolerances: ``--tolerances FILE``, else ``EXP_DIR/quality.toml`` when present, else the defaults of
:mod:`quality.tolerances`; flags override single values. Which outputs are evaluated and how a lesion is matched
to its mask: :mod:`quality.outputs`; what is measured: :mod:`quality.measure`. Exit status 1 when an output
could not be evaluated (each named with the reason), or with ``--fail-on-reject`` when a lesion failed a check.

From Python: ``evaluate_experiment(exp_dir) -> list[LesionQuality]``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ldm.cli import add_version, examples, run_command  # noqa: E402
from quality.evaluation import Evaluation  # noqa: E402
from quality.fidelity import fidelity, weakest  # noqa: E402
from quality.gate import evaluate_outputs  # noqa: E402
from quality.measure import LesionQuality  # noqa: E402
from quality.outputs import WHICH, find_outputs, paste_rim, read_linet_report  # noqa: E402
from quality.tables import write_results  # noqa: E402
from quality.tolerances import CHECKS, Tolerances, resolve_tolerances  # noqa: E402

MAX_LISTED = 20


def run_evaluation(exp_dir: str | os.PathLike, tolerances: Tolerances | None = None, which: str = "latest",
                   rim_mm: float | None = None, seg_version: str | None = None, plot: bool = True,
                   progress: bool = True) -> Evaluation:
    """Evaluate the outputs of ``exp_dir`` and write the CSV, summary and plot there; returns the Evaluation
    (graded lesions, outputs that failed to evaluate, cases skipped).

    ``tolerances``: default from ``EXP_DIR/quality.toml`` or the built-in ones; ``rim_mm``/``seg_version``: default
    from ``linet_report.json``'s options, else 2 mm and ``v1``."""
    exp_dir = Path(exp_dir)
    tolerances = tolerances or resolve_tolerances(exp_dir)
    rim_mm = paste_rim(exp_dir, rim_mm)
    if seg_version is None:
        seg_version = ((read_linet_report(exp_dir) or {}).get("options") or {}).get("seg_version", "v1")
    specs, skipped = find_outputs(exp_dir, which)
    evaluation = evaluate_outputs(specs, exp_dir, tolerances, rim_mm, skipped, seg_version, progress)
    write_results(exp_dir, evaluation, plot=plot)
    return evaluation


def evaluate_experiment(exp_dir: str | os.PathLike, tolerances: Tolerances | None = None, which: str = "latest",
                        rim_mm: float | None = None, seg_version: str | None = None, plot: bool = True,
                        progress: bool = True) -> list[LesionQuality]:
    """:func:`run_evaluation`, returning the graded lesions only (outputs in list order, lesions largest first)."""
    return run_evaluation(exp_dir, tolerances, which, rim_mm, seg_version, plot, progress).lesions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples("python pipeline/evaluate.py exp",
                        "python pipeline/evaluate.py exp --hu-abs 30 --disable extent --fail-on-reject"))
    parser.add_argument("exp_dir", help="experiment folder (preprocess.py, then test.py with LMNet and LINet)")
    parser.add_argument("--tolerances", metavar="FILE.toml", help="tolerance file (default: EXP_DIR/quality.toml)")
    parser.add_argument("--which", choices=WHICH, default="latest",
                        help="latest: the outputs of the last LINet run; all: every inpainting_<k> (default latest)")
    parser.add_argument("--hu-abs", type=float, help="largest |mean HU - CT value| (default 50)")
    parser.add_argument("--iso-band", dest="iso_band_hu", type=float, help="iso band around the organ, HU (10)")
    parser.add_argument("--min-inside", dest="min_inside_fraction", type=float, help="inside-organ fraction (0.9)")
    parser.add_argument("--volume-ratio", nargs=2, type=float, metavar=("LOW", "HIGH"), help="(0.3 2.0)")
    parser.add_argument("--extent-ratio", nargs=2, type=float, metavar=("LOW", "HIGH"), help="(0.5 1.5)")
    parser.add_argument("--max-components", type=int, help="mask components per box (1)")
    parser.add_argument("--max-changed-outside", dest="max_changed_outside_voxels", type=int,
                        help="voxels changed outside the paste region (0)")
    parser.add_argument("--shell-mm", type=float, help="organ shell for the density reference, mm (10)")
    parser.add_argument("--disable", nargs="+", choices=CHECKS, metavar="CHECK",
                        help=f"checks that never fail: {', '.join(CHECKS)}")
    parser.add_argument("--rim-mm", type=float, help="blend rim of the paste, mm (default: linet_report.json, else 2)")
    parser.add_argument("--seg-version", choices=("v1", "v2"), help="label order of the segmentations")
    parser.add_argument("--fail-on-reject", action="store_true", help="exit 1 when any lesion fails a check")
    parser.add_argument("--no-plot", action="store_true", help="do not write quality.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-d", "--debug", action="store_true", help="show tracebacks")
    return add_version(parser)


def tolerances_from_args(args: argparse.Namespace) -> Tolerances:
    """The tolerance file (or defaults) with the flags that were given applied."""
    base = resolve_tolerances(args.exp_dir, args.tolerances)
    ranges = {name: tuple(getattr(args, name)) for name in ("volume_ratio", "extent_ratio") if getattr(args, name)}
    return base.with_overrides(hu_abs=args.hu_abs, iso_band_hu=args.iso_band_hu,
                               min_inside_fraction=args.min_inside_fraction, max_components=args.max_components,
                               max_changed_outside_voxels=args.max_changed_outside_voxels, shell_mm=args.shell_mm,
                               disabled=tuple(args.disable) if args.disable else None, **ranges)


def summary_lines(evaluation: Evaluation, exp_dir: Path) -> list[str]:
    """What the command prints: counts, failures per check, the failed lesions, skipped cases, written files."""
    lesions = evaluation.lesions
    passed = sum(lesion.passed for lesion in lesions)
    lines = [f"quality: {len(evaluation.outputs)} output(s), {len(lesions)} lesion(s), {passed} passed, "
             f"{len(lesions) - passed} failed"]
    failures = {name: sum(lesion.checks.get(name) is False for lesion in lesions) for name in CHECKS}
    if any(failures.values()):
        counts = ", ".join(f"{name} {count}" for name, count in failures.items() if count)
        lines.append(f"  failures by check: {counts}")
    failed = [lesion for lesion in lesions if not lesion.passed]
    for lesion in failed[:MAX_LISTED]:
        lines.append(f"  {lesion.case} {Path(lesion.output).name} lesion {lesion.lesion}: "
                     f"failed {', '.join(lesion.failed_checks)}")
    if len(failed) > MAX_LISTED:
        lines.append(f"  ... and {len(failed) - MAX_LISTED} more (see quality.csv)")
    lines.extend(f"  skipped {item.case_id}: {item.reason}" for item in evaluation.skipped)
    rows = fidelity(lesions)
    judged = [row for row in rows if row.judged]
    if judged:
        lines.append("fidelity (agreement with the reports, lesions judged):")
        lines.extend(f"  {row.attribute:<34} {100 * row.rate:5.1f} %  ({row.agree} of {row.judged})" for row in judged)
        lines.append("  weakest attributes: " + ", ".join(f"{row.attribute} ({100 * row.rate:.0f} %)"
                                                         for row in weakest(rows)))
    lines.append(f"table: {exp_dir / 'quality.csv'}; summary: {exp_dir / 'quality_summary.json'}; fidelity: "
                 f"{exp_dir / 'fidelity.csv'}; review: {exp_dir / 'review.html'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    return run_command(run, build_parser().parse_args(argv), "evaluate.py")


def run(args: argparse.Namespace) -> int:
    """Run the command for parsed arguments; returns the exit status."""
    evaluation = run_evaluation(args.exp_dir, tolerances_from_args(args), args.which, args.rim_mm,
                                args.seg_version, not args.no_plot, not args.no_progress)
    for line in summary_lines(evaluation, Path(args.exp_dir)):
        print(line)
    for error in evaluation.errors:
        print(f"evaluate.py: {error.case_id} {error.output}: {error.error}", file=sys.stderr)
    if evaluation.errors:
        print(f"evaluate.py: {len(evaluation.errors)} output(s) could not be evaluated", file=sys.stderr)
        return 1
    return 1 if args.fail_on_reject and any(not lesion.passed for lesion in evaluation.lesions) else 0


if __name__ == "__main__":
    sys.exit(main())
