"""How far an inpainted CT differs from its input: changed voxels outside the lesion and their distance to it.

    .venv/bin/python bench/paste_reach.py --input CT.nii.gz --output inpainting_0.nii.gz --label LABEL.nii.gz

``LABEL`` marks the lesion with ``--lesion-value`` (2: ``inpainting_<k>_label.nii.gz`` or ``samples_<k>.nii.gz``)
on the grid of both CTs. Prints one JSON object: lesion voxels, changed voxels inside and outside the lesion, the
largest distance (mm, Euclidean with the voxel spacing) of a changed voxel from the lesion and the largest |HU
change| outside it. Every changed voxel outside the lesion is label noise for a segmentation model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))

from inference.source_grid import voxel_sizes  # noqa: E402


def reach(input_path: str, output_path: str, label_path: str, lesion_value: int = 2) -> dict:
    """The measurements of the module docstring, as a dict."""
    source, output, label = (nib.load(path) for path in (input_path, output_path, label_path))
    if not (source.shape == output.shape == label.shape and np.allclose(source.affine, output.affine)
            and np.allclose(source.affine, label.affine)):
        raise SystemExit("paste_reach.py: the three files must share one voxel grid")
    before, after = source.get_fdata(dtype=np.float64), output.get_fdata(dtype=np.float64)
    lesion = np.asanyarray(label.dataobj) == lesion_value
    changed = before != after
    outside = changed & ~lesion
    spacing = voxel_sizes(source.affine)
    distance = ndimage.distance_transform_edt(~lesion, sampling=spacing) if lesion.any() else np.zeros(lesion.shape)
    return {"grid": list(source.shape), "spacing_mm": [round(s, 3) for s in spacing],
            "lesion_voxels": int(lesion.sum()), "changed_in_lesion": int((changed & lesion).sum()),
            "changed_outside_lesion": int(outside.sum()),
            "max_distance_mm": round(float(distance[outside].max(initial=0.0)), 2),
            "max_abs_hu_outside": round(float(np.abs(after - before)[outside].max(initial=0.0)), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="the CT before inpainting")
    parser.add_argument("--output", required=True, help="the inpainted CT, same grid")
    parser.add_argument("--label", required=True, help="lesion label, same grid")
    parser.add_argument("--lesion-value", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(reach(args.input, args.output, args.label, args.lesion_value)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
