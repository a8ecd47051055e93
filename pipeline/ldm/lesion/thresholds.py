"""Every number that turns a measured lesion into a report phrase, or decides whether a phrase agrees: one place.

:class:`Thresholds` holds them (HU, mm, fractions); its defaults are the project's defaults. Dataset preparation
uses the defaults; the quality gate overrides the few ``quality.toml`` exposes (``iso_band_hu``, ``shell_mm``,
``hu_abs``, ``extent_ratio``) by building a copy with :func:`dataclasses.replace`.
"""
from __future__ import annotations

from dataclasses import dataclass

AORTA_V1_ID = 7


@dataclass(frozen=True)
class Thresholds:
    """The thresholds of :mod:`ldm.lesion.measure`, :mod:`ldm.lesion.phrases` and :mod:`ldm.lesion.compare`."""

    # Measurement.
    shell_mm: float = 10.0  # organ shell around the lesion whose median HU is the density reference
    lumen_mm: float = 5.0  # depth inside a hollow organ that counts as its lumen (preprocess.py's 5-voxel wall)
    min_voxels: int = 10  # fewer interior / shell / rim voxels than this: fall back (see the measure module)
    adjacent_search_mm: float = 20.0  # farthest other structure looked for
    tail_stds: float = 2.0  # a "density area" voxel lies this many organ-noise SDs from the lesion's mean
    min_aorta_voxels: int = 20  # fewer aorta voxels: enhancement undecided
    # Phrases.
    iso_band_hu: float = 10.0  # |contrast with the organ| within this is isodense
    fluid_hu: tuple[float, float] = (-10.0, 20.0)  # a homogeneous hypodense lesion here is fluid-like
    mixed_fraction: float = 0.25  # this much of the interior below the iso band and as much above: mixed
    heterogeneous_ratio: float = 1.5  # interior SD above this times the organ's noise ...
    heterogeneous_min_hu: float = 5.0  # ... and this many HU above it: heterogeneous
    tail_fraction: float = 0.08  # a tail holding this much of the interior is a decreased/increased density area
    nodular_mm: float = 6.0  # equivalent diameter below this: nodular
    round_solidity: float = 0.85  # solidity at least this ...
    round_elongation: float = 2.0  # ... and elongation at most this: round-like
    sharp_leak: float = 0.4  # margin leak below this: well-defined
    adjacent_mm: float = 5.0  # another structure this close: close relationship
    lumen_fraction: float = 0.5  # this much of a hollow organ's lesion in the lumen: within the lumen
    lung_soft_tissue_hu: float = -100.0  # lung lesion mean above this: soft tissue mass, else ground glass
    enhanced_aorta_hu: float = 150.0  # aorta mean above this: enhanced CT
    # Agreement of a requested value with the measured one.
    hu_abs: float = 50.0  # |interior mean - requested CT value|
    extent_ratio: tuple[float, float] = (0.5, 1.5)  # measured / requested box extent, every file axis


DEFAULT = Thresholds()
