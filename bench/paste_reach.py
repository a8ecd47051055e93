"""How far an inpainted CT differs from its input: changed voxels outside the lesion and their distance to it.

    .venv/bin/python bench/paste_reach.py --input CT.nii.gz --output inpainting_0.nii.gz --label LABEL.nii.gz

``LABEL`` marks the lesion with 2 (``inpainting_<k>_label.nii.gz`` or ``samples_<k>.nii.gz``) on the grid of both
CTs. Prints one JSON object (:func:`inference.source_grid.measure_changes`): lesion voxels, changed voxels inside
and outside the lesion, the largest distance (mm) of a changed voxel from the lesion and the largest |HU change|
outside it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))

from inference.source_grid import measure_changes  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="the CT before inpainting")
    parser.add_argument("--output", required=True, help="the inpainted CT, same grid")
    parser.add_argument("--label", required=True, help="lesion label (2 = lesion), same grid")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(json.dumps(measure_changes(args.input, args.output, args.label)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
