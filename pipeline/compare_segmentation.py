"""Does the synthetic data help? Compare a baseline segmentation model (real cases only) with an augmented one
(real + synthetic) on the same real cases: Dice, lesion-wise sensitivity and false-positive lesions per case,
overall and by lesion size, with paired bootstrap 95 % intervals.

    python pipeline/compare_segmentation.py BASELINE_PRED AUGMENTED_PRED LABELS [--lesion-label 2]
        [--min-overlap 0.1] [--json comparison.json] [--bootstrap 2000] [--seed 0]

BASELINE_PRED / AUGMENTED_PRED: folders of ``<case>.nii.gz`` predictions (``nnUNetv2_predict``'s output), or
nnU-Net training folders whose ``fold_<k>/validation/`` predictions are gathered; LABELS: the reference labels
(e.g. the baseline dataset's ``labelsTr``). Prints the table, writes ``--json`` and beside it ``.csv`` (summary),
``_cases.csv`` (per case) and ``.png`` (per-case Dice). Rules and statistics: :mod:`experiments.compare` and
:mod:`experiments.lesions`. A case that cannot be compared is named with the reason, the others are compared, and
the exit status is 1.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from experiments.compare import DEFAULT_BOOTSTRAP, compare_predictions  # noqa: E402
from experiments.lesions import DEFAULT_MIN_OVERLAP  # noqa: E402
from experiments.report import format_table, write_report  # noqa: E402
from ldm.cli import run_command  # noqa: E402
from ldm.cli import HelpFormatter, add_version, examples  # noqa: E402
from ldm.errors import DataError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compare_segmentation.py", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
        epilog=examples("python pipeline/compare_segmentation.py base_pred aug_pred labelsTr --json cmp/result.json",
                        "python pipeline/compare_segmentation.py base_pred aug_pred labelsTr --lesion-label 1"))
    parser.add_argument("baseline_pred", help="predictions of the baseline model (real cases only)")
    parser.add_argument("augmented_pred", help="predictions of the augmented model (real + synthetic)")
    parser.add_argument("labels", help="reference labels, <case>.nii.gz (e.g. Dataset<ID>_<Name>Real/labelsTr)")
    parser.add_argument("--lesion-label", type=int, default=2, help="label value of a lesion (default 2; 1 for "
                        "datasets exported with --labels lesion)")
    parser.add_argument("--min-overlap", type=float, default=DEFAULT_MIN_OVERLAP,
                        help="fraction of a reference lesion's voxels a prediction must cover to find it (default 0.1)")
    parser.add_argument("--json", default="segmentation_comparison.json",
                        help="results file; .csv, _cases.csv and .png go beside it (default ./%(default)s)")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, help="bootstrap draws (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-d", "--debug", action="store_true", help="show tracebacks")
    return add_version(parser)


def run(args: argparse.Namespace) -> int:
    """Run the comparison for parsed arguments; returns the exit status."""
    progress = None if args.no_progress else partial(tqdm, desc="compare", unit="case")
    comparison = compare_predictions(args.baseline_pred, args.augmented_pred, args.labels, args.lesion_label,
                                     args.min_overlap, args.bootstrap, args.seed, progress)
    for case, reason in comparison.errors:
        print(f"compare_segmentation.py: {reason}", file=sys.stderr)
    if not comparison.cases:
        raise DataError(f"{args.labels}: no case could be compared ({len(comparison.errors)} failed)")
    print(format_table(comparison))
    paths = write_report(comparison, args.json)
    print(f"wrote {paths['json']}, {paths['csv']}, {paths['cases_csv']}, {paths['png']}")
    if comparison.errors:
        print(f"compare_segmentation.py: {len(comparison.errors)} case(s) not compared: "
              f"{', '.join(case for case, _ in comparison.errors)}", file=sys.stderr)
    return 1 if comparison.errors else 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (1 when a case could not be compared)."""
    return run_command(run, build_parser().parse_args(argv), "compare_segmentation.py")


if __name__ == "__main__":
    sys.exit(main())
