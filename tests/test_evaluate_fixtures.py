"""Builders shared by the quality-gate and nnU-Net export tests (no tests here): an experiment folder laid out as
``preprocess.py`` + ``test.py`` leave it, made from phantoms whose lesions are known, so no model is needed.

Per case ``exp/<case>/``: ``ct.nii.gz`` (the phantom's healthy CT: the inference input), ``totalseg.nii.gz``,
``type.json``, ``bbox.nii.gz`` (the lesion's bounding box, value 2), ``samples_0.nii.gz`` (the phantom label:
1 organ, 2 lesion) and ``inpainting_0.nii.gz`` (the phantom CT with its lesion); the lists
``{img,seg,type,bbox,label}_list.txt`` and a ``linet_report.json`` naming each output.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from demo.make_phantoms import make_phantoms
from ldm.data.volume import read_label, read_volume, write_volume

LISTS = {"img_list.txt": "ct.nii.gz", "seg_list.txt": "totalseg.nii.gz", "type_list.txt": "type.json",
         "bbox_list.txt": "bbox.nii.gz", "label_list.txt": "samples_0.nii.gz"}
PASTE_OPTIONS = {"rim_mm": 12.0}  # 6 voxels of the 2 mm phantoms


def write_linet_report(exp_dir: Path, cases: list[str], options: dict | None = None) -> Path:
    """A ``linet_report.json`` as the LINet run writes it: options and one done case per folder."""
    report = {"stage": "linet",
              "options": {**PASTE_OPTIONS, "seg_version": "v1", "lists": {"label": "label_list.txt"},
                          **(options or {})},
              "cases": [{"index": index, "case_id": case, "status": "done",
                         "outputs": {"image": str(exp_dir / case / "inpainting_0.nii.gz")}, "lesions": []}
                        for index, case in enumerate(cases)]}
    path = exp_dir / "linet_report.json"
    path.write_text(json.dumps(report, indent=1))
    return path


def phantom_experiment(root: Path, n: int = 5, seed: int = 0, shape=(32, 64, 64), spacing=2.0,
                       orientation: str = "LPS") -> tuple[Path, dict]:
    """Phantoms under ``root/phantoms`` arranged as the experiment ``root/exp``; returns ``(exp_dir, manifest)``."""
    made = make_phantoms(root / "phantoms", n=n, seed=seed, shape=shape, spacing=spacing, orientation=orientation,
                         progress=False)
    source, exp_dir = Path(made["out_dir"]), root / "exp"
    cases = [entry["case"] for entry in made["manifest"]["cases"]]
    for case in cases:
        folder = exp_dir / case
        folder.mkdir(parents=True)
        for name, target in (("healthy.nii.gz", "ct.nii.gz"), ("seg.nii.gz", "totalseg.nii.gz"),
                             ("type.json", "type.json"), ("label.nii.gz", "samples_0.nii.gz"),
                             ("image.nii.gz", "inpainting_0.nii.gz")):
            shutil.copyfile(source / case / name, folder / target)
        label, geometry = read_label(source / case / "label.nii.gz")
        box = np.zeros(label.shape, dtype=np.uint8)
        box[tuple(slice(low, high) for low, high in zip(*bbox_zyx(label == 2)))] = 2
        write_volume(folder / "bbox.nii.gz", box, geometry, dtype=np.uint8)
    for list_name, file_name in LISTS.items():
        (exp_dir / list_name).write_text("".join(f"{case}/{file_name}\n" for case in cases))
    write_linet_report(exp_dir, cases)
    return exp_dir, made["manifest"]


def bbox_zyx(mask: np.ndarray) -> tuple[list[int], list[int]]:
    """``(start, stop)`` voxel indices of a boolean mask's bounding box (stop exclusive)."""
    positions = np.argwhere(mask)
    return positions.min(axis=0).tolist(), (positions.max(axis=0) + 1).tolist()


def rewrite_volume(path: Path, change) -> None:
    """Read ``path`` (HU or labels as float), apply ``change(array) -> array`` and write it back, same dtype."""
    array, geometry = read_volume(path)
    write_volume(path, change(array.copy()), geometry, dtype=geometry.header.get_data_dtype())


def edit_report(path: Path, **attributes) -> None:
    """Replace attribute values (element [2]) of every entry of a ``type.json``."""
    report = json.loads(path.read_text())
    for entry in report.values():
        entry[2].update(attributes)
    path.write_text(json.dumps(report))
