"""Grids and smooth random shapes for synthetic volumes (phantoms, tests).

:func:`geometry_for` builds the :class:`~ldm.data.volume.Geometry` of a new volume from the in-memory
``(z, y, x)`` shape, the voxel size and the file orientation, so that :func:`~ldm.data.volume.write_volume`
writes it with the requested axis codes. Shapes are drawn in the canonical in-memory frame (``LAS``: +x towards
the patient's left, +y anterior, +z superior), in mm measured from the centre of the volume.
"""
from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from ldm.data.volume import Geometry
from ldm.errors import ConfigError

# Axis code -> (world axis in nibabel's RAS+ frame, direction along it).
_AXCODE_DIRECTIONS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def _three_numbers(values, name: str, integer: bool = False, positive: bool = True) -> tuple:
    """``values`` as a tuple of three finite numbers (ints when ``integer``); ConfigError naming ``name`` otherwise."""
    try:
        items = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        items = ()
    if len(items) != 3 or not all(
        np.isfinite(v) and (v > 0 or not positive) and (v.is_integer() or not integer) for v in items
    ):
        kind = ("positive " if positive else "finite ") + ("integers" if integer else "numbers")
        raise ConfigError(f"{name} must be three {kind}, got {values!r}")
    return tuple(int(v) for v in items) if integer else items


def geometry_for(shape_zyx, spacing_zyx, axcodes=("L", "P", "S"), origin=None) -> Geometry:
    """Geometry of a new axis-aligned volume.

    ``shape_zyx``: in-memory array shape; ``spacing_zyx``: voxel size in mm along ``(z, y, x)``; ``axcodes``: the
    file orientation in nibabel's convention (``("L", "P", "S")`` as the upstream demo, ``("R", "A", "S")``, or
    any permutation such as ``("P", "S", "R")``); ``origin``: world position (mm, RAS+) of file voxel
    ``(0, 0, 0)``, by default chosen so that the centre of the volume sits at the world origin.
    Returns a Geometry whose ``shape_zyx``/``spacing_zyx`` equal the requested ones.
    """
    shape_zyx = _three_numbers(shape_zyx, "shape", integer=True)
    spacing_zyx = _three_numbers(spacing_zyx, "spacing")
    axcodes = tuple(str(code).upper() for code in axcodes)
    if len(axcodes) != 3 or any(code not in _AXCODE_DIRECTIONS for code in axcodes) or len(
        {_AXCODE_DIRECTIONS[code][0] for code in axcodes}
    ) != 3:
        raise ConfigError(f"axcodes must name each of L/R, A/P, S/I once, got {axcodes!r}")
    # World axis w (x, y, z) is in-memory axis 2 - w.
    shape_xyz, spacing_xyz = shape_zyx[::-1], spacing_zyx[::-1]
    affine = np.eye(4)
    file_shape, file_zooms = [], []
    for file_axis, code in enumerate(axcodes):
        world_axis, direction = _AXCODE_DIRECTIONS[code]
        affine[:3, file_axis] = 0.0
        affine[world_axis, file_axis] = direction * spacing_xyz[world_axis]
        file_shape.append(shape_xyz[world_axis])
        file_zooms.append(spacing_xyz[world_axis])
    if origin is None:
        centre_voxel = (np.array(file_shape, dtype=np.float64) - 1.0) / 2.0
        affine[:3, 3] = -affine[:3, :3] @ centre_voxel
    else:
        affine[:3, 3] = _three_numbers(origin, "origin", positive=False)
    header = nib.Nifti1Header()
    header.set_data_shape(file_shape)
    header.set_zooms(file_zooms)
    header.set_xyzt_units("mm")
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    return Geometry(affine=affine, shape=tuple(file_shape), header=header, source="synthetic volume")


@dataclass(frozen=True)
class Grid:
    """Voxel centres of a ``(z, y, x)`` array in mm from the volume centre (canonical LAS directions)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def half_extent(self) -> np.ndarray:
        """Distance in mm from the centre to the outer voxel faces along ``(z, y, x)``."""
        return np.array(self.shape) * np.array(self.spacing) / 2.0

    def window(self, centre_mm, radius_mm: float) -> tuple[slice, slice, slice]:
        """Index slices covering the ball of ``radius_mm`` around ``centre_mm``, clipped to the array."""
        slices = []
        for axis in range(3):
            offset = (self.shape[axis] - 1) / 2.0
            low = int(np.floor((centre_mm[axis] - radius_mm) / self.spacing[axis] + offset))
            high = int(np.ceil((centre_mm[axis] + radius_mm) / self.spacing[axis] + offset)) + 1
            slices.append(slice(max(low, 0), max(min(high, self.shape[axis]), 0)))
        return tuple(slices)

    def coordinates(self, window=(slice(None),) * 3) -> list[np.ndarray]:
        """Open (broadcastable) ``[z, y, x]`` coordinate arrays in mm for the voxels of ``window``."""
        axes = []
        for axis in range(3):
            indices = np.arange(self.shape[axis])[window[axis]]
            positions = (indices - (self.shape[axis] - 1) / 2.0) * self.spacing[axis]
            view = [1, 1, 1]
            view[axis] = positions.size
            axes.append(positions.reshape(view))
        return axes


def random_rotation(rng: np.random.Generator, max_angle_deg: float) -> np.ndarray:
    """A rotation matrix (3x3) about a random axis by an angle uniform in ``[-max_angle_deg, max_angle_deg]``."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_angle_deg, max_angle_deg))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


@dataclass(frozen=True)
class Blob:
    """An ellipsoid whose surface radius is modulated by smooth lobes: ``|q| < 1 + sum_k a_k cos(f_k . q^ + p_k)``.

    ``centre`` and ``semi_axes`` in mm (``(z, y, x)`` frame), ``rotation`` maps blob axes to ``(z, y, x)``.
    With no lobes it is an exact (rotated) ellipsoid.
    """

    centre: np.ndarray
    semi_axes: np.ndarray
    rotation: np.ndarray
    lobe_frequencies: np.ndarray
    lobe_phases: np.ndarray
    lobe_amplitudes: np.ndarray

    @property
    def reach(self) -> float:
        """Largest distance in mm from the centre to any voxel of the blob."""
        return float(np.max(self.semi_axes) * (1.0 + np.abs(self.lobe_amplitudes).sum()))

    def scaled(self, factor: float) -> "Blob":
        """The same blob with every semi-axis multiplied by ``factor``."""
        return Blob(self.centre, self.semi_axes * factor, self.rotation, self.lobe_frequencies, self.lobe_phases,
                    self.lobe_amplitudes)

    def moved(self, centre_mm) -> "Blob":
        """The same blob centred at ``centre_mm``."""
        return Blob(np.asarray(centre_mm, dtype=np.float64), self.semi_axes, self.rotation, self.lobe_frequencies,
                    self.lobe_phases, self.lobe_amplitudes)

    def mask(self, grid: Grid) -> np.ndarray:
        """Boolean ``(z, y, x)`` array of the voxels whose centre lies inside the blob."""
        inside = np.zeros(grid.shape, dtype=bool)
        window = grid.window(self.centre, self.reach)
        z, y, x = grid.coordinates(window)
        offsets = (z - self.centre[0], y - self.centre[1], x - self.centre[2])
        # Coordinates along the blob's own axes, in units of its semi-axes.
        local = [sum(self.rotation[row, axis] * offsets[row] for row in range(3)) / self.semi_axes[axis]
                 for axis in range(3)]
        radius = np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2)
        safe = np.maximum(radius, 1e-9)
        boundary = np.ones_like(radius)
        for frequency, phase, amplitude in zip(self.lobe_frequencies, self.lobe_phases, self.lobe_amplitudes):
            boundary = boundary + amplitude * np.cos(sum(frequency[a] * local[a] for a in range(3)) / safe + phase)
        inside[window] = radius < boundary
        return inside


def random_blob(
    rng: np.random.Generator, centre_mm, semi_axes_mm, irregularity: float = 0.0, max_tilt_deg: float = 20.0,
    lobes: int = 4,
) -> Blob:
    """A randomly tilted ellipsoid; ``irregularity`` > 0 adds ``lobes`` lobes whose amplitudes sum to it (< 1)."""
    if not 0.0 <= irregularity < 1.0:
        raise ConfigError(f"irregularity must be in [0, 1), got {irregularity}")
    count = lobes if irregularity > 0 else 0
    directions = rng.standard_normal((count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    frequencies = directions * rng.uniform(3.5, 6.0, size=(count, 1))
    weights = rng.uniform(0.5, 1.0, size=count)
    amplitudes = irregularity * weights / weights.sum() if count else np.zeros(0)
    return Blob(
        centre=np.asarray(centre_mm, dtype=np.float64),
        semi_axes=np.asarray(semi_axes_mm, dtype=np.float64),
        rotation=random_rotation(rng, max_tilt_deg),
        lobe_frequencies=frequencies,
        lobe_phases=rng.uniform(0.0, 2.0 * np.pi, size=count),
        lobe_amplitudes=amplitudes,
    )


def smooth_field(rng: np.random.Generator, grid: Grid, wavelength_mm: float, waves: int = 8) -> np.ndarray:
    """A smooth random ``(z, y, x)`` field of zero mean and unit variance (over space): a sum of ``waves``
    plane waves in random directions with wavelengths around ``wavelength_mm``."""
    z, y, x = grid.coordinates()
    field = np.zeros(grid.shape)
    for _ in range(waves):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        wavenumber = 2.0 * np.pi / (wavelength_mm * rng.uniform(0.7, 1.3))
        phase = rng.uniform(0.0, 2.0 * np.pi)
        # cos(k.p + phase) as the real part of a product of per-axis complex exponentials: three 1D cosines'
        # worth of work instead of one per voxel.
        wave = np.exp(1j * (wavenumber * direction[0] * z + phase)) * np.exp(1j * wavenumber * direction[1] * y)
        field += (wave * np.exp(1j * wavenumber * direction[2] * x)).real
    return field * np.sqrt(2.0 / waves)


def distance_inside(mask: np.ndarray, spacing) -> np.ndarray:
    """Distance in mm from each voxel of ``mask`` to the nearest voxel outside it (0 outside the mask; the array
    border counts as outside)."""
    distance = np.zeros(mask.shape)
    if mask.any():
        box = ndimage.find_objects(mask.astype(np.int8))[0]
        inner = ndimage.distance_transform_edt(np.pad(mask[box], 1), sampling=spacing)
        distance[box] = inner[1:-1, 1:-1, 1:-1]
    return distance


def within_distance(mask: np.ndarray, others: np.ndarray, spacing, distance_mm: float) -> bool:
    """True when a voxel of ``others`` lies within ``distance_mm`` (centre to centre) of a voxel of ``mask``."""
    if not mask.any():
        return False
    reach = [int(np.ceil(distance_mm / s)) + 1 for s in spacing]
    mask_box = ndimage.find_objects(mask.astype(np.int8))[0]
    box = tuple(slice(max(b.start - r, 0), b.stop + r) for b, r in zip(mask_box, reach))
    if not others[box].any():
        return False
    distance = ndimage.distance_transform_edt(~others[box], sampling=spacing)
    return float(distance[mask[box]].min()) <= distance_mm
