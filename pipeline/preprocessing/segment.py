"""Organ segmentation in TotalSegmentator v1 order, on the grid of the standardised CT.

Two sources: TotalSegmentator run through its Python API (``task``, ``fast``, ``device``, ``v1_order=True``), or a
segmentation the user already has (``--seg-list``, TotalSegmentator v1 or v2 numbering, converted to v1 and
resampled by nearest neighbour onto the standardised CT). TotalSegmentator's usage statistics are switched off
in its ``config.json`` before it runs, and missing weights are reported before it would try to download them.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from ldm.data.organs import NUM_V1_CLASSES, to_v1
from ldm.data.volume import read_geometry
from ldm.errors import ConfigError, DataError, MissingWeightsError
from ldm.fileio import write_json_atomic
from preprocessing.standardise import labels_on_grid, write_file_grid

SEGMENTATION_VERSIONS = ("v1", "v2")
# Only the "total" task has a v1 label order (TotalSegmentator's own v1_order option).
TASKS = ("total",)
_DEVICE = re.compile(r"^(auto|cpu|gpu|mps|gpu:\d+)$")


def resolve_device(device: str) -> str:
    """TotalSegmentator device string: ``auto`` -> ``gpu`` when CUDA is available, else ``cpu``."""
    if not _DEVICE.match(str(device)):
        raise ConfigError(f"--seg-device {device!r}: expected auto, cpu, gpu, gpu:N or mps")
    if device == "auto":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return device


def disable_telemetry() -> Path:
    """Write ``send_usage_stats: false`` into TotalSegmentator's ``config.json`` (kept otherwise); returns its path."""
    from totalsegmentator.config import get_totalseg_dir

    home = get_totalseg_dir()
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.json"
    config = {}
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            config = {}
    config.setdefault("totalseg_id", "totalseg_offline")
    config.setdefault("prediction_counter", 0)
    config["send_usage_stats"] = False
    config["statistics_disclaimer_shown"] = True
    return write_json_atomic(path, config, indent=4)


def _download_hint(task: str, fast: bool) -> str:
    name = f"{task}_fast" if fast else task
    return (
        f"install them with `totalseg_download_weights -t {name}` (on a machine with internet, then copy the folder), "
        "point TOTALSEG_HOME_DIR or TOTALSEG_WEIGHTS_PATH at existing weights, or pass --seg-list with organ "
        "segmentations you already have"
    )


def missing_weights(task: str = "total", fast: bool = False) -> list[Path]:
    """Weight folders TotalSegmentator needs for ``task`` that are not on disk (checked without any network)."""
    try:
        from totalsegmentator.config import get_weights_dir
        from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS
        from totalsegmentator.python_api import get_task_config

        task_ids = get_task_config(task, fast=fast, quiet=True)["task_id"]
        infos = [TASK_ID_WEIGHTS_CONFIGS[i] for i in (task_ids if isinstance(task_ids, list) else [task_ids])]
    except (ImportError, KeyError, AttributeError, TypeError, ValueError):
        # Another TotalSegmentator version with other internals: skip the check; a failed download is still caught.
        return []
    folders = [get_weights_dir() / info.get("rel_path", "") / info["foldername"] for info in infos]
    return [folder for folder in folders if not folder.is_dir()]


def check_weights(task: str = "total", fast: bool = False) -> None:
    """MissingWeightsError (one line, with what to do) when TotalSegmentator's weights for ``task`` are absent."""
    if task not in TASKS:
        raise ConfigError(f"--seg-task {task!r}: only {', '.join(TASKS)} gives organ labels in the v1 order LesionDiffusion uses")
    missing = missing_weights(task, fast)
    if missing:
        raise MissingWeightsError(
            f"TotalSegmentator weights for task '{task}'{' (fast)' if fast else ''} are not installed "
            f"(missing {missing[0]}): {_download_hint(task, fast)}"
        )


def ready_to_segment(device: str, task: str = "total", fast: bool = False) -> None:
    """Before any case runs TotalSegmentator: ``device`` is valid, the weights are installed (errors say what to
    do) and TotalSegmentator's usage statistics are off."""
    resolve_device(device)
    check_weights(task, fast)
    disable_telemetry()


def run_totalsegmentator(ct_path: str | os.PathLike, target: str | os.PathLike, task: str = "total",
                         fast: bool = False, device: str = "auto") -> Path:
    """Segment the standardised CT with TotalSegmentator (v1 order); writes uint8 labels on the CT's grid to ``target``."""
    import requests
    from totalsegmentator.python_api import totalsegmentator

    reference = read_geometry(ct_path)
    try:
        # One image per call: one export process is enough (the default of 6 spawns 6 Python processes).
        result = totalsegmentator(nib.load(str(ct_path)), None, ml=True, task=task, fast=fast,
                                  device=resolve_device(device), quiet=True, v1_order=True, nr_thr_saving=1)
    except requests.exceptions.RequestException as error:
        raise MissingWeightsError(
            f"TotalSegmentator tried to download its weights and failed ({type(error).__name__}): {_download_hint(task, fast)}"
        ) from None
    labels = labels_on_grid(result, reference, name=f"TotalSegmentator output for {ct_path}")
    return write_file_grid(target, labels, reference, np.uint8)


def import_segmentation(seg_path: str | os.PathLike, version: str, ct_path: str | os.PathLike,
                        target: str | os.PathLike) -> Path:
    """Convert a user segmentation (``version`` v1 or v2) to v1 on the standardised CT's grid; writes uint8 ``target``."""
    if version not in SEGMENTATION_VERSIONS:
        raise ConfigError(f"--seg-version {version!r}: expected one of {', '.join(SEGMENTATION_VERSIONS)}")
    reference = read_geometry(ct_path)
    labels = labels_on_grid(seg_path, reference)
    if labels.min(initial=0) < 0 or labels.max(initial=0) > (NUM_V1_CLASSES if version == "v1" else 255):
        hint = " (a TotalSegmentator 2.x file? pass --seg-version v2)" if version == "v1" else ""
        raise DataError(f"{seg_path}: label values {labels.min()}..{labels.max()} are not TotalSegmentator {version} ids{hint}")
    try:
        v1_labels = to_v1(labels, version)
    except DataError as error:
        raise DataError(f"{seg_path}: {error}") from None
    return write_file_grid(target, v1_labels, reference, np.uint8)
