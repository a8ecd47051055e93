"""Describe the lesions of a label map on their CT: the report the scan supports and the measurements behind it.

    python pipeline/describe.py CT LABEL [--seg SEG --seg-version v1|v2] [--lesion-label 2] [--organ NAME]
                                [--json OUT.json]

For every lesion (face-connected component of ``LABEL == --lesion-label``, largest first) it prints the
``type.json`` entry ``prepare_dataset.py`` would write (the original format and vocabulary) and the measurements
behind every phrase, units in the names. Any grid, orientation, dtype or scaling; inputs are never written.
Without ``--seg`` the organ is the label's value 1 and ``--organ`` names it. What each phrase means:
:mod:`ldm.lesion.phrases`; the definitions: :mod:`ldm.lesion.measure`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ldm.cli import HelpFormatter, add_version, examples, run_command  # noqa: E402
from ldm.fileio import write_json_atomic  # noqa: E402
from preparation.describe import describe_files  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="describe.py", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
        epilog=examples("python pipeline/describe.py ct.nii.gz label.nii.gz --seg seg.nii.gz --seg-version v2",
                        "python pipeline/describe.py ct.nii.gz label.nii.gz --organ liver --json lesions.json"))
    parser.add_argument("ct", help="the CT (NIfTI, HU after the header's scaling)")
    parser.add_argument("label", help="label map on the CT's grid holding the lesions")
    parser.add_argument("--seg", help="organ segmentation on the CT's grid (TotalSegmentator)")
    parser.add_argument("--seg-version", choices=("v1", "v2"), default="v1", help="label ids of --seg (default v1)")
    parser.add_argument("--lesion-label", type=int, default=2, help="value of the lesions in LABEL (default 2)")
    parser.add_argument("--organ", help="organ the lesions lie in (default: the segmented organ holding each)")
    parser.add_argument("--json", metavar="OUT.json", help="also write every lesion's report and measurements here")
    parser.add_argument("-d", "--debug", action="store_true", help="show tracebacks")
    return add_version(parser)


def run(args: argparse.Namespace) -> int:
    """Describe, print, optionally write the JSON; returns the exit status."""
    described = describe_files(args.ct, args.label, args.seg, args.seg_version, args.lesion_label, args.organ)
    for lesion in described:
        entry = lesion.as_dict()
        print(f"lesion {lesion.rank} ({entry['organ']}, {entry['measurements']['voxels']} voxels)")
        print(json.dumps(lesion.report, indent=2))
        width = max(len(name) for name in entry["measurements"])
        for name, value in entry["measurements"].items():
            print(f"  {name:<{width}}  {value}")
        if entry["undecided"]:
            print(f"  undecided (fallback phrase): {', '.join(entry['undecided'])}")
    if args.json:
        write_json_atomic(args.json, [lesion.as_dict() for lesion in described])
        print(f"written: {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    return run_command(run, build_parser().parse_args(argv), "describe.py")


if __name__ == "__main__":
    sys.exit(main())
