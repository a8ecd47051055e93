"""Spacing guard: LMNet and LINet work in voxels (crops, box sizes), so a CT at another voxel size than the one
the model was trained at gets lesions of another physical size and texture. The release models were trained at
1 mm (``inference.training_spacing_mm``); a case whose spacing differs by more than
``inference.spacing_tolerance_mm`` on any axis is named in a warning (resample it with ``preprocess.py --spacing``).
``preprocess.py`` and ``synthesize.py`` take their default ``--spacing`` from the configs (:func:`command_spacing`).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from ldm.data.volume import read_geometry
from inference.cases import CaseSpec
from inference.options import InferenceOptions


def spacing_warning(case: CaseSpec, options: InferenceOptions) -> str | None:
    """The warning for ``case`` when its CT's voxel size (mm) is off the training spacing, else ``None``.

    A CT that cannot be read gives ``None``: the case itself then fails with the reason."""
    if options.training_spacing_mm is None:
        return None
    try:
        spacing = np.asarray(read_geometry(case.paths["image"]).spacing_zyx, dtype=float)
    except Exception:  # noqa: BLE001 - reading the case reports this file properly
        return None
    trained = np.asarray(options.training_spacing_mm, dtype=float)
    if np.abs(spacing - trained).max() <= options.spacing_tolerance_mm:
        return None
    shown = " x ".join(f"{value:.3g}" for value in spacing)
    trained_shown = " x ".join(f"{value:.3g}" for value in trained)
    return (f"spacing {shown} mm (z, y, x) differs from the model's training spacing {trained_shown} mm by more "
            f"than {options.spacing_tolerance_mm:g} mm: crops are in voxels, so lesions come out at another "
            f"physical size; resample the CT with preprocess.py --spacing")


def spacing_warnings(cases: Sequence[CaseSpec], options: InferenceOptions) -> dict[int, str]:
    """Check every case up front; warns once per case off the training spacing (naming it) and returns
    ``{case index: warning}`` for the run's results."""
    found = {}
    for case in cases:
        message = spacing_warning(case, options)
        if message:
            warnings.warn(f"{case.case_id}: {message}")
            found[case.index] = message
    return found


def command_spacing(spacing: Sequence[float] | None, options: Sequence[InferenceOptions],
                    default_mm: float = 1.0, warn: bool = True) -> list[float]:
    """A command's ``--spacing`` (mm, x y z or one value): by default the ``training_spacing_mm`` of the first of
    ``options`` that states one (else ``default_mm``); a given spacing off it is named in one warning (unless
    ``warn`` is false: ``synthesize.py`` leaves that to the ``preprocess.py`` it runs)."""
    trained = next((option.training_spacing_mm for option in options if option.training_spacing_mm), None)
    if spacing is None:
        return list(trained[::-1]) if trained else [default_mm]
    if trained is not None and warn:
        given = np.broadcast_to(np.asarray(spacing, dtype=float)[::-1], (3,))
        if np.abs(given - np.asarray(trained)).max() > options[0].spacing_tolerance_mm:
            shown = " ".join(f"{value:g}" for value in spacing)
            trained_shown = " x ".join(f"{value:g}" for value in trained)
            warnings.warn(f"--spacing {shown} mm differs from the models' training spacing {trained_shown} mm "
                          "(z, y, x; inference.training_spacing_mm): crops are in voxels, so lesions come out at "
                          "another physical size; leave --spacing out to work at the training spacing")
    return list(spacing)
