"""The lesions of the demo phantoms: drawn into one organ of a phantom CT, with what was drawn (which the report
of :mod:`demo.make_phantoms` then says).

``lesions="mixed"``: the lesion kinds of :data:`LESION_KINDS` in turn (cyst, tumour, kidney and spleen lesions,
bladder wall thickening); ``"attributes"``: a liver lesion whose density, shape, margin, density variations and
size are drawn independently (``bench/text_control.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ldm.data.crops import largest_component
from ldm.data.organs import organ_id
from ldm.data.synthetic_geometry import Grid, distance_inside, random_blob, smooth_field
from ldm.errors import ConfigError

LESION_KINDS = (("liver", "cyst"), ("liver", "tumour"), ("kidney", "lesion"), ("spleen", "lesion"),
                ("urinary bladder", "wall thickening"))
# Attribute phantoms (lesions="attributes"): every lesion in the liver, each attribute drawn on its own.
FOCAL_LESION = "focal lesion"
DENSITIES = ("hypo", "iso", "hyper")
ATTRIBUTE_OFFSET_HU = {"hypo": (-60.0, -35.0), "iso": (-3.0, 3.0), "hyper": (35.0, 60.0)}
ATTRIBUTE_RADIUS_MM = (6.0, 9.0)  # a round lesion's radius; lobulated ones reach LOBE_REACH x that (< 16 voxels)
LOBES, LOBE_OFFSET, LOBE_RADIUS = 4, 1.0, 0.6  # lobe centres this far out, lobe and core radius, x the radius
LOBE_REACH = LOBE_OFFSET + LOBE_RADIUS
FADING_HALO_GAIN = 3.0  # a fading margin that the measurement calls ill-defined with room to spare
TWO_PART_HU = (20.0, 25.0)  # each half this far from the lesion's mean: clearly beyond the noise (10-15 HU)


@dataclass
class Lesion:
    """A drawn lesion: where it is, how it blends in and what was drawn (which the report must say)."""

    organ: str
    kind: str
    mask: np.ndarray
    weight: np.ndarray
    values: np.ndarray
    irregular: bool
    blurred: bool
    heterogeneous: bool



def _blend_weight(mask: np.ndarray, organ: np.ndarray, blurred: bool, spacing, halo_gain: float = 2.0) -> np.ndarray:
    """Weight of the lesion over the healthy CT: the mask itself (sharp) or a Gaussian-blurred mask kept to the
    organ (ill-defined margin; ``halo_gain`` sets how much contrast the first voxels outside the mask keep)."""
    if not blurred:
        return mask.astype(np.float64)
    sigma_mm = 1.2 * float(np.mean(spacing))
    blurred_mask = ndimage.gaussian_filter(mask.astype(np.float64), sigma=[sigma_mm / s for s in spacing])
    # Full contrast inside the lesion, a halo fading over ~2 sigma outside it: the margin is ill-defined while the
    # lesion keeps the density it was drawn with.
    halo = np.minimum(1.0, halo_gain * blurred_mask)
    halo[halo < 0.02] = 0.0  # end the halo ~2.3 sigma out instead of at the filter's truncation radius
    return np.maximum(mask, halo) * organ


def _fitted_blob(rng, semi_mm, irregular: bool, max_reach_mm: float):
    """A random blob with ``semi_mm`` semi-axes, shrunk so that it reaches at most ``max_reach_mm`` from its centre."""
    blob = random_blob(rng, (0, 0, 0), semi_mm, irregularity=0.6 if irregular else 0.0, max_tilt_deg=45.0, lobes=6)
    return blob.scaled(min(1.0, 0.98 * max_reach_mm / blob.reach))


def _random_centre(rng, grid: Grid, depth: np.ndarray, min_depth_mm: float) -> np.ndarray:
    """A random voxel centre (mm) at least ``min_depth_mm`` inside the organ whose depth map is ``depth``."""
    candidates = np.flatnonzero(depth >= min_depth_mm)
    centre_index = np.unravel_index(candidates[int(rng.integers(candidates.size))], grid.shape)
    return np.array([float(axis.ravel()[i]) for axis, i in zip(grid.coordinates(), centre_index)])


def _attribute_lesion(rng, grid: Grid, organ: np.ndarray, organ_hu: float) -> Lesion:
    """A liver lesion whose attributes are drawn independently (module docstring, ``lesions="attributes"``)."""
    density = DENSITIES[int(rng.integers(len(DENSITIES)))]
    irregular, blurred = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    two_part = density != "iso" and bool(rng.random() < 0.5)  # an iso lesion in two parts is mixed-density
    target = organ_hu + rng.uniform(*ATTRIBUTE_OFFSET_HU[density])
    depth = distance_inside(organ, grid.spacing)
    margin = max(grid.spacing)
    radius = min(rng.uniform(*ATTRIBUTE_RADIUS_MM), (depth.max() - margin) / LOBE_REACH)
    centre = _random_centre(rng, grid, depth, radius * (LOBE_REACH if irregular else 1.0) + margin)
    if irregular:  # lobulated: a cluster of balls around a smaller core, deep notches between them
        mask = random_blob(rng, centre, np.full(3, LOBE_RADIUS * radius)).mask(grid)
        for direction in rng.standard_normal((LOBES, 3)):
            offset = LOBE_OFFSET * radius * direction / np.linalg.norm(direction)
            mask |= random_blob(rng, centre + offset, np.full(3, LOBE_RADIUS * radius)).mask(grid)
        mask = largest_component(mask & organ)
    else:
        mask = random_blob(rng, centre, radius * rng.uniform(0.85, 1.0, size=3), max_tilt_deg=45.0).mask(grid) & organ
    values = np.full(grid.shape, target)
    if two_part:
        # Two halves either side of a random plane through the lesion's centroid, one brighter, one darker.
        centroid = np.argwhere(mask).mean(axis=0)
        axes = np.ogrid[tuple(slice(0, size) for size in grid.shape)]
        side = sum(n * (axis - c) for n, axis, c in zip(rng.standard_normal(3), axes, centroid))
        values = values + rng.uniform(*TWO_PART_HU) * np.where(side > 0, 1.0, -1.0)
    weight = _blend_weight(mask, organ, blurred, grid.spacing, halo_gain=FADING_HALO_GAIN)
    return Lesion("liver", FOCAL_LESION, mask, weight, values, irregular, blurred, two_part)


def _solid_lesion(rng, grid: Grid, organ: np.ndarray, organ_name: str, kind: str, organ_hu: float) -> Lesion:
    """A blob entirely inside a solid organ; intensity, shape, margin and texture drawn per lesion kind."""
    family = organ_name.split()[0]  # "kidney left" -> "kidney"
    if kind == "cyst":
        irregular, blurred, heterogeneous, target = False, False, False, rng.uniform(2.0, 12.0)
    else:
        irregular, blurred = bool(rng.random() < 0.5), bool(rng.random() < 0.45)
        density = rng.choice(["hypo", "hyper", "iso"], p=[0.5, 0.3, 0.2] if family == "liver" else [0.7, 0.3, 0.0])
        offset = {"hypo": rng.uniform(-40.0, -25.0), "hyper": rng.uniform(22.0, 32.0), "iso": rng.uniform(-3.0, 3.0)}
        target = organ_hu + offset[density]
        heterogeneous = density == "iso" or (family != "kidney" and bool(rng.random() < 0.5))
    depth = distance_inside(organ, grid.spacing)
    if depth.max() <= 0:
        raise ConfigError(f"the {organ_name} is empty at shape {grid.shape}; use a larger --shape")
    margin = max(grid.spacing)
    semi = (depth.max() - margin) * rng.uniform(0.5, 0.7) * rng.uniform(0.85, 1.0, size=3)
    blob = _fitted_blob(rng, semi, irregular, depth.max() - margin)
    if irregular and blob.semi_axes.min() < 2.5 * max(grid.spacing):
        # Lobes of a lesion only a few voxels across would not show: draw it round.
        irregular, blob = False, _fitted_blob(rng, semi, False, depth.max() - margin)
    if blob.semi_axes.min() < 1.5 * min(grid.spacing):
        raise ConfigError(f"the {organ_name} is too small for a lesion at shape {grid.shape} and spacing "
                          f"{grid.spacing} mm; use a larger --shape")
    mask = blob.moved(_random_centre(rng, grid, depth, blob.reach + margin)).mask(grid) & organ
    heterogeneous = heterogeneous and blob.semi_axes.min() >= 2.5 * max(grid.spacing)
    values = np.full(grid.shape, target)
    if heterogeneous:
        texture = smooth_field(rng, grid, 1.2 * float(blob.semi_axes.mean()))
        values += rng.uniform(25.0, 32.0) * (texture - texture[mask].mean())
    weight = _blend_weight(mask, organ, blurred, grid.spacing)
    return Lesion(organ_name, kind, mask, weight, values, irregular, blurred, bool(heterogeneous))


def _wall_thickening(rng, grid: Grid, organ: np.ndarray) -> Lesion:
    """An irregular patch of thickened wall of a hollow organ, grown inwards from a random point of its wall."""
    depth = distance_inside(organ, grid.spacing)
    wall = np.flatnonzero(organ & (depth <= max(grid.spacing) * 1.01))
    if wall.size == 0:
        raise ConfigError(f"the urinary bladder is empty at shape {grid.shape}; use a larger --shape")
    point = np.unravel_index(wall[int(rng.integers(wall.size))], grid.shape)
    z, y, x = grid.coordinates()
    distance = np.sqrt((z - z.ravel()[point[0]]) ** 2 + (y - y.ravel()[point[1]]) ** 2 + (x - x.ravel()[point[2]]) ** 2)
    wobble = smooth_field(rng, grid, 12.0)
    extent = depth.max() * rng.uniform(0.7, 1.0) * (1.0 + 0.2 * wobble)
    thickness = max(grid.spacing) * rng.uniform(2.2, 3.2) * (1.0 + 0.3 * wobble)
    # A thin shell can fall apart into pieces; inference treats each face-connected piece as its own lesion.
    mask = largest_component(organ & (distance <= extent) & (depth <= thickness))
    blurred = bool(rng.random() < 0.4)
    values = np.full(grid.shape, rng.uniform(38.0, 50.0))
    weight = _blend_weight(mask, organ, blurred, grid.spacing)
    return Lesion("urinary bladder", "wall thickening", mask, weight, values, True, blurred, False)


def draw_lesion(rng, grid: Grid, index: int, hu: np.ndarray, seg: np.ndarray, lesions: str) -> Lesion:
    """The lesion of case ``index``: for ``lesions="mixed"`` the lesion kinds take turns, so any 5 consecutive cases
    cover all of them; for ``"attributes"`` a liver lesion with independently drawn attributes."""
    if lesions == "attributes":
        liver = seg == organ_id("liver")
        return _attribute_lesion(rng, grid, liver, float(np.median(hu[liver])))
    organ_name, kind = LESION_KINDS[index % len(LESION_KINDS)]
    if organ_name == "kidney":
        organ_name = f"kidney {'right' if rng.random() < 0.5 else 'left'}"
    organ = seg == organ_id(organ_name)
    if organ_name == "urinary bladder":
        return _wall_thickening(rng, grid, organ)
    organ_hu = float(np.median(hu[organ])) if organ.any() else 0.0
    return _solid_lesion(rng, grid, organ, organ_name, kind, organ_hu)
