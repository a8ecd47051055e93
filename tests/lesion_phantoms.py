"""Phantoms whose one lesion is known by construction, for the tests of :mod:`ldm.lesion` and ``describe.py``.

A body of fat (-100 HU) holds a liver (60 HU) and, beside it, the right kidney (30 HU); every tissue carries
Gaussian noise of :data:`NOISE_HU`. Each :class:`Known` lesion is drawn in the liver with the phrases it must get
(``expected``: attribute -> phrase). Arrays are ``(z, y, x)`` on an isotropic grid of ``spacing`` mm.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage

LIVER, KIDNEY_RIGHT, LUNG_LOBE = 5, 2, 13
NOISE_HU = 6.0
LIVER_HU, KIDNEY_HU, FAT_HU, LUNG_HU = 60.0, 30.0, -100.0, -850.0
EXTENT_MM = (60.0, 84.0, 84.0)
LIVER_CENTRE_MM, LIVER_SEMI_MM = (30.0, 42.0, 36.0), (24.0, 34.0, 28.0)
KIDNEY_CENTRE_MM, KIDNEY_SEMI_MM = (30.0, 42.0, 74.0), (12.0, 12.0, 9.0)


def ellipsoid(shape, spacing, centre_mm, semi_mm) -> np.ndarray:
    """Boolean ellipsoid of semi-axes ``semi_mm`` around ``centre_mm`` (voxel centres at ``index * spacing``)."""
    grids = np.meshgrid(*[np.arange(n) * spacing for n in shape], indexing="ij")
    return sum(((g - c) / s) ** 2 for g, c, s in zip(grids, centre_mm, semi_mm)) <= 1.0


@dataclass
class Known:
    """A lesion by construction: how it is drawn and the phrases it must be described with."""

    name: str
    mask: Callable[[tuple, float], np.ndarray]
    hu: Callable[[np.ndarray, float], np.ndarray] | float
    expected: dict[str, str] = field(default_factory=dict)
    halo_mm: float = 0.0
    organ: str = "liver"


def ball(centre_mm, radius_mm):
    return lambda shape, spacing: ellipsoid(shape, spacing, centre_mm, (radius_mm,) * 3)


def lobulated(shape, spacing):
    centre = np.asarray(LIVER_CENTRE_MM)
    lobes = [centre + offset for offset in ((0, 0, 0), (0, 9, 0), (0, -9, 0), (0, 0, 9), (0, 0, -9))]
    return np.any([ellipsoid(shape, spacing, c, (5.0, 5.0, 5.0)) for c in lobes], axis=0)


def two_part(mask: np.ndarray, spacing: float) -> np.ndarray:
    """20 HU below the lesion's middle slice, 100 HU above: mean about iso, each half far from it."""
    z = np.indices(mask.shape)[0] * spacing
    return np.where(z < LIVER_CENTRE_MM[0], 20.0, 100.0)


SOLID = {"density variations": "homogeneous,", "shape": "round-like,", "surface characteristics": "well-defined margin,",
         "cavity": "within the parenchymal organ,",
         "relationship with adjacent organs": "no close relationship with surrounding organs,"}
KNOWN = [
    Known("hypo round sharp", ball(LIVER_CENTRE_MM, 8.0), 30.0, {**SOLID, "density": "hypodense lesion,"}),
    Known("hyper round", ball(LIVER_CENTRE_MM, 8.0), 110.0, {**SOLID, "density": "hyperdense lesion,"}),
    # Isodense: no margin to see, so the surface gets its fallback (and is n/a in a comparison).
    Known("iso", ball(LIVER_CENTRE_MM, 8.0), 62.0,
          {**SOLID, "density": "isodense lesion,", "surface characteristics": "ill-defined margin,"}),
    Known("fluid cyst", ball(LIVER_CENTRE_MM, 8.0), 5.0, {**SOLID, "density": "hypodense fluid-like lesion,"}),
    Known("lobulated", lobulated, 30.0, {**SOLID, "density": "hypodense lesion,", "shape": "irregular,"}),
    Known("elongated", lambda shape, spacing: ellipsoid(shape, spacing, LIVER_CENTRE_MM, (4.5, 4.5, 18.0)), 30.0,
          {**SOLID, "density": "hypodense lesion,", "shape": "irregular,"}),
    Known("fading margin", ball(LIVER_CENTRE_MM, 8.0), 30.0,
          {**SOLID, "density": "hypodense lesion,", "surface characteristics": "ill-defined margin,"}, halo_mm=4.0),
    Known("two-part", ball(LIVER_CENTRE_MM, 9.0), two_part,
          {**SOLID, "density": "mixed-density lesion,", "density variations": "heterogeneous,",
           "surface characteristics": "ill-defined margin,",  # its mean is isodense: fallback
           "specific features": "presence of decreased density areas,presence of increased density areas,"}),
    Known("protruding", ball((30.0, 42.0, 36.0 - 28.0), 8.0), 30.0,
          {**SOLID, "density": "hypodense lesion,", "cavity": "protruding from the parenchymal organ,"}),
    Known("next to the kidney", ball((30.0, 42.0, 56.0), 6.0), 30.0,
          {**SOLID, "density": "hypodense lesion,",
           "relationship with adjacent organs": "close relationship with adjacent organs,"}),
    Known("lung soft tissue", ball(LIVER_CENTRE_MM, 7.0), 30.0, {"density": "isodense soft tissue mass,"},
          organ="lung"),
    Known("lung ground glass", ball(LIVER_CENTRE_MM, 7.0), -600.0, {"density": "low-density ground-glass opacity,"},
          organ="lung"),
]


def render(known: Known, spacing: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ct HU, lesion mask, v1 segmentation)`` of ``known`` at ``spacing`` mm; the segmentation leaves the
    lesion's organ intact (a healthy counterpart's), the lesion is cut to the body."""
    shape = tuple(int(round(e / spacing)) for e in EXTENT_MM)
    rng = np.random.default_rng(seed)
    organ = ellipsoid(shape, spacing, LIVER_CENTRE_MM, LIVER_SEMI_MM)
    kidney = ellipsoid(shape, spacing, KIDNEY_CENTRE_MM, KIDNEY_SEMI_MM) & ~organ
    organ_id, organ_hu = (LUNG_LOBE, LUNG_HU) if known.organ == "lung" else (LIVER, LIVER_HU)
    seg = np.where(organ, organ_id, np.where(kidney, KIDNEY_RIGHT, 0)).astype(np.int16)
    ct = np.where(organ, organ_hu, np.where(kidney, KIDNEY_HU, FAT_HU))
    lesion = known.mask(shape, spacing)
    values = known.hu(lesion, spacing) if callable(known.hu) else np.full(shape, float(known.hu))
    if known.halo_mm:
        distance = ndimage.distance_transform_edt(~lesion, sampling=spacing)
        weight = np.where(lesion, 1.0, np.exp(-distance / known.halo_mm * 2.0)) * organ
        ct = ct + weight * (values - ct)
    else:
        ct = np.where(lesion, values, ct)
    ct = ct + rng.normal(0.0, NOISE_HU, shape)
    return ct.astype(np.float32), lesion, seg
