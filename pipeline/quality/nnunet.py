"""nnU-Net v2 raw datasets: folder and case names, label schemes, ``dataset.json``, and the read-back check.

Layout (nnU-Net v2 ``dataset_format``): ``Dataset<id:03d>_<name>/imagesTr/<case>_0000.nii.gz`` (channel 0, CT),
``labelsTr/<case>.nii.gz`` and ``dataset.json`` with the keys nnU-Net requires (``channel_names``, ``labels``,
``numTraining``, ``file_ending``) plus ``name``, ``description``, ``licence``, ``converted_by`` and a
``lesiondiffusion`` block saying how the dataset was made.

Label schemes: ``organ-lesion`` (0 background, 1 organ, 2 lesion: the values of LMNet's masks and of the
original training labels) or ``lesion`` (0 background, 1 lesion). With the ``ignore`` label (nnU-Net v2 treats
the highest value named ``ignore`` as "not annotated": no loss there), failed lesions can be kept out of training
without dropping their case; it is declared only when a case uses it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import nibabel as nib
import numpy as np

from ldm.data.volume import read_geometry
from ldm.errors import ConfigError, DataError

FILE_ENDING = ".nii.gz"
CHANNEL_SUFFIX = "_0000"
SCHEMES = {"organ-lesion": {"background": 0, "organ": 1, "lesion": 2}, "lesion": {"background": 0, "lesion": 1}}
SOURCE_VALUES = (0, 1, 2)  # background, organ, lesion in masks and original labels
IGNORE = "ignore"
AFFINE_ATOL = 1e-4
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``Dataset501_SynthLesions``; ConfigError for an id outside 1..999 or a name nnU-Net cannot use."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ConfigError(f"--dataset-id: must be an integer in 1..999, got {dataset_id!r}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"--name: {name!r} must be letters, digits, '_' or '-' (e.g. SynthLesions)")
    return f"Dataset{dataset_id:03d}_{name}"


def check_free_id(out_dir: Path, folder_name: str) -> None:
    """DataError when ``out_dir`` holds another dataset with the same id (nnU-Net could not tell them apart)."""
    prefix = folder_name.split("_", 1)[0] + "_"
    if out_dir.is_dir():
        clash = sorted(p.name for p in out_dir.iterdir() if p.name.startswith(prefix) and p.name != folder_name)
        if clash:
            raise DataError(f"{out_dir}: {clash[0]} already uses the id of {folder_name}; choose another --dataset-id")


def safe_identifier(text: str, taken: set[str]) -> str:
    """A case identifier made of letters, digits, ``_`` and ``-``, not in ``taken`` (which it is added to)."""
    base = _UNSAFE.sub("_", text).strip("_") or "case"
    identifier, number = base, 2
    while identifier in taken:
        identifier, number = f"{base}_{number}", number + 1
    taken.add(identifier)
    return identifier


def scheme_labels(scheme: str) -> dict[str, int]:
    """``labels`` of ``dataset.json`` for a scheme (without the ignore label)."""
    if scheme not in SCHEMES:
        raise ConfigError(f"--labels: {scheme!r} is not one of {', '.join(SCHEMES)}")
    return dict(SCHEMES[scheme])


def ignore_value(scheme: str) -> int:
    """The value of the ignore label: one above the scheme's highest label, as nnU-Net v2 requires."""
    return max(scheme_labels(scheme).values()) + 1


def remap_label(source: np.ndarray, scheme: str, path: str | Path) -> np.ndarray:
    """A 0/1/2 (background/organ/lesion) label map in ``scheme``'s values (uint8); DataError naming ``path`` for
    other values."""
    found = np.unique(source)
    unexpected = [int(v) for v in found if int(v) not in SOURCE_VALUES]
    if unexpected:
        raise DataError(f"{path}: label values {unexpected} are not 0 (background), 1 (organ) or 2 (lesion)")
    if scheme == "lesion":
        return (source == 2).astype(np.uint8)
    return source.astype(np.uint8)


def dataset_json(name: str, labels: dict[str, int], num_training: int, provenance: dict[str, Any]) -> dict[str, Any]:
    """The ``dataset.json`` content (the fields of ``nnunetv2.dataset_conversion.generate_dataset_json``)."""
    return {
        "channel_names": {"0": "CT"},
        "labels": dict(labels),
        "numTraining": int(num_training),
        "file_ending": FILE_ENDING,
        "name": name,
        "description": "CTs with synthetic lesions (LesionDiffusion), optionally mixed with real cases",
        "licence": "that of the source CTs",
        "converted_by": "LesionDiffusion pipeline/export_nnunet.py",
        "lesiondiffusion": provenance,
    }


def image_name(identifier: str) -> str:
    return f"{identifier}{CHANNEL_SUFFIX}{FILE_ENDING}"


def label_name(identifier: str) -> str:
    return f"{identifier}{FILE_ENDING}"


@dataclass(frozen=True)
class VerifiedCase:
    """A case read back from the written dataset: its identifier and the label values found."""

    identifier: str
    values: tuple[int, ...]


def _label_values(path: Path) -> tuple[int, ...]:
    data = np.asanyarray(nib.load(str(path)).dataobj)
    if np.issubdtype(data.dtype, np.floating) and np.any(np.mod(data, 1) != 0):
        raise DataError(f"{path}: label holds fractional values")
    return tuple(int(v) for v in np.unique(data))


def verify_dataset(dataset_dir: Path, identifiers: Iterable[str]) -> list[VerifiedCase]:
    """Read the written dataset back: every case has an image and a label on the same grid (shape and affine),
    label values are among those declared, ``numTraining`` matches and nothing else sits in the folders.
    Returns what was found; DataError naming the file otherwise."""
    declared = json.loads((dataset_dir / "dataset.json").read_text())
    allowed = set(declared["labels"].values())
    identifiers = sorted(identifiers)
    if declared["numTraining"] != len(identifiers):
        raise DataError(f"{dataset_dir}: dataset.json says {declared['numTraining']} cases, {len(identifiers)} written")
    present = {"imagesTr": sorted(p.name for p in (dataset_dir / "imagesTr").iterdir()),
               "labelsTr": sorted(p.name for p in (dataset_dir / "labelsTr").iterdir())}
    expected = {"imagesTr": sorted(image_name(i) for i in identifiers),
                "labelsTr": sorted(label_name(i) for i in identifiers)}
    for folder in present:
        if present[folder] != expected[folder]:
            extra = sorted(set(present[folder]) - set(expected[folder]))
            missing = sorted(set(expected[folder]) - set(present[folder]))
            raise DataError(f"{dataset_dir / folder}: unexpected files {extra[:3]}, missing {missing[:3]}")
    verified = []
    for identifier in identifiers:
        image_path = dataset_dir / "imagesTr" / image_name(identifier)
        label_path = dataset_dir / "labelsTr" / label_name(identifier)
        image, label = read_geometry(image_path), read_geometry(label_path)
        if image.shape != label.shape or not np.allclose(image.affine, label.affine, atol=AFFINE_ATOL):
            raise DataError(f"{label_path}: its grid (shape {label.shape}) does not match {image_path.name} "
                            f"(shape {image.shape})")
        values = _label_values(label_path)
        if not set(values) <= allowed:
            raise DataError(f"{label_path}: label values {sorted(set(values) - allowed)} are not declared in "
                            f"dataset.json {declared['labels']}")
        verified.append(VerifiedCase(identifier, values))
    return verified
