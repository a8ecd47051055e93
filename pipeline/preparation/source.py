"""An nnU-Net v2 raw dataset as input: ``dataset.json``, ``imagesTr/<case>_0000<ending>``, ``labelsTr/<case><ending>``.

Only the first channel (``_0000``, the CT) is read; ``file_ending`` must be a NIfTI ending. Every case seen in
either folder is a case: an image without its label (or a label without its image, or a missing ``--seg-dir``
file) becomes that case's error, so the other cases still run. The label values given on the command line must
be labels that ``dataset.json`` declares (when it declares integer values).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ldm.errors import ConfigError, DataError

DATASET_JSON = "dataset.json"
IMAGES, LABELS = "imagesTr", "labelsTr"
CT_CHANNEL = "_0000"
NIFTI_ENDINGS = (".nii.gz", ".nii")
LAYOUT = f"{DATASET_JSON}, {IMAGES}/<case>{CT_CHANNEL}.nii.gz, {LABELS}/<case>.nii.gz"


@dataclass(frozen=True)
class SourceCase:
    """One case of the dataset; ``problem`` says why it cannot be prepared (None when its files are there)."""

    index: int
    case_id: str
    image: Path
    label: Path
    seg: Path | None = None
    problem: str | None = None


@dataclass
class SourceDataset:
    """The dataset folder, its ``dataset.json`` name, ``labels`` (name -> integer value) and cases (sorted)."""

    root: Path
    name: str
    file_ending: str
    labels: dict[str, int]
    cases: list[SourceCase]

    def label_names(self, values: Sequence[int]) -> list[str]:
        """Names ``dataset.json`` gives the label ``values`` (the value itself where it gives none)."""
        by_value = {value: name for name, value in self.labels.items()}
        return [by_value.get(int(value), str(value)) for value in values]

    def check_labels(self, values: Sequence[int], flag: str) -> None:
        """ConfigError when a value is not a label of ``dataset.json`` (or is background)."""
        for value in values:
            if int(value) == 0:
                raise ConfigError(f"{flag} 0 is the background; give the label value(s) of the {flag[2:].replace('-', ' ')}")
            if self.labels and int(value) not in self.labels.values():
                declared = ", ".join(f"{name}={number}" for name, number in self.labels.items())
                raise ConfigError(f"{flag} {value}: {self.root / DATASET_JSON} declares no such label ({declared})")


def _read_dataset_json(root: Path) -> dict:
    path = root / DATASET_JSON
    if not path.is_file():
        raise DataError(f"{root}: no {DATASET_JSON}, so this is not an nnU-Net v2 raw dataset (expected {LAYOUT})")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise DataError(f"{path}: cannot read it as JSON ({error})") from None
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a JSON object with 'labels' and 'file_ending'")
    return content


def _integer_labels(content: dict) -> dict[str, int]:
    """``labels`` entries with one integer value (nnU-Net region labels, lists of values, are skipped)."""
    labels = content.get("labels") or {}
    return {str(name): int(value) for name, value in labels.items() if isinstance(value, int) and not isinstance(value, bool)}


def _stems(folder: Path, ending: str, suffix: str = "") -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    tail = f"{suffix}{ending}"
    return {entry.name[: -len(tail)]: entry for entry in folder.iterdir()
            if entry.name.endswith(tail) and len(entry.name) > len(tail) and not entry.name.startswith(".")}


def _problem(case_id: str, image: Path, label: Path, seg: Path | None) -> str | None:
    if not image.is_file():
        return f"label {label} has no image {image.name} in {IMAGES}/"
    if not label.is_file():
        return f"image {image} has no label {label.name} in {LABELS}/"
    if seg is not None and not seg.is_file():
        return f"no organ segmentation {seg} (--seg-dir needs one <case>.nii.gz per case)"
    return None


def _seg_file(seg_dir: Path, case_id: str) -> Path:
    """``<seg_dir>/<case>.nii.gz``, or ``<case>.nii`` when only that exists."""
    candidates = [seg_dir / f"{case_id}{ending}" for ending in NIFTI_ENDINGS]
    return next((path for path in candidates if path.is_file()), candidates[0])


def read_dataset(root: str | os.PathLike, seg_dir: str | os.PathLike | None = None) -> SourceDataset:
    """The cases of the dataset at ``root`` (sorted by case id); DataError when it is not an nnU-Net v2 raw dataset."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    content = _read_dataset_json(root)
    ending = str(content.get("file_ending", ".nii.gz"))
    if ending not in NIFTI_ENDINGS:
        raise DataError(f"{root / DATASET_JSON}: file_ending {ending!r} is not NIfTI; only .nii.gz and .nii are read")
    images = _stems(root / IMAGES, ending, CT_CHANNEL)
    labels = _stems(root / LABELS, ending)
    case_ids = sorted(set(images) | set(labels))
    if not case_ids:
        raise DataError(f"{root}: no case found (expected {LAYOUT})")
    cases = []
    for index, case_id in enumerate(case_ids):
        image = root / IMAGES / f"{case_id}{CT_CHANNEL}{ending}"
        label = root / LABELS / f"{case_id}{ending}"
        seg = _seg_file(Path(seg_dir), case_id) if seg_dir is not None else None
        cases.append(SourceCase(index, case_id, image, label, seg, _problem(case_id, image, label, seg)))
    return SourceDataset(root, str(content.get("name", root.name)), ending, _integer_labels(content), cases)
