"""The quality checks and their tolerances: documented defaults, a ``quality.toml`` file, command-line overrides.

``hu``              ``|mean HU of the lesion's interior - report CT value| <= hu_abs`` (50 HU); the interior is
                    the lesion eroded by one voxel, as ``prepare_dataset.py`` measures the ``CT value`` it writes
``density``         the ``density`` verdict of :func:`ldm.lesion.compare`: same class (hypo/iso/hyper against the
                    surrounding organ, iso within ``iso_band_hu``, 10 HU; in a lung: soft tissue mass or ground
                    glass); ``n/a`` for mixed density or ring enhancement
``inside_organ``    fraction of lesion voxels in the report's organ >= ``min_inside_fraction`` (0.9); hollow organs
                    are dilated by one voxel first (their wall is often left out of the segmentation)
``volume``          lesion volume / volume of the ellipsoid inscribed in the report's size (the LMNet target) within
                    ``volume_ratio`` (0.3 .. 2.0)
``extent``          bounding-box extent / report size, along each file axis, within ``extent_ratio`` (0.5 .. 1.5)
``components``      mask components falling in the lesion's box (``bbox.nii.gz``) <= ``max_components`` (1)
``unchanged_outside`` voxels of the inpainted CT that differ from the input outside the paste region (the lesions
                    and the ``rim_mm`` around them) <= ``max_changed_outside_voxels``
                    (0); a property of the whole output, so it fails every lesion of that output
``attributes``      every attribute of ``fail_attributes`` that :func:`ldm.lesion.compare` judges agrees with the
                    report (one that disagrees fails the lesion; ``n/a`` never fails); the verdicts of the other
                    attributes are written but do not fail
=================== ==============================================================================================

``quality.toml`` (every key optional; unknown keys are errors)::

    [tolerances]
    hu_abs = 50.0
    iso_band_hu = 10.0
    min_inside_fraction = 0.9
    volume_ratio = [0.3, 2.0]
    extent_ratio = [0.5, 1.5]
    max_components = 1
    max_changed_outside_voxels = 0
    shell_mm = 10.0            # width of the organ shell the density reference is measured in
    disabled = ["extent"]      # checks that never fail
    fail_attributes = ["lesion location", "density variations", "cavity",
                       "relationship with adjacent organs"]   # attributes whose disagreement fails a lesion
=======
The checks, what each measures and passes at, and the ``quality.toml`` format are written once, in
``docs/quality.md`` (a test compares its TOML example with the defaults of :class:`Tolerances`). A lesion passes
when every applicable check passes; a check whose request is absent from the report is ``n/a`` and does not fail;
``unchanged_outside`` is a property of the whole output, so it fails every lesion of that output. Every key of the
file is optional; unknown keys are errors.
"""
from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from ldm.errors import ConfigError
from ldm.lesion import ATTRIBUTES, DEFAULT, Thresholds

CHECKS = ("hu", "density", "inside_organ", "volume", "extent", "components", "unchanged_outside", "attributes")
# The attributes the measurement decides reliably on the phantoms and the real CT of the tests (docs/quality.md).
DEFAULT_FAIL_ATTRIBUTES = ("lesion location", "density variations", "cavity", "relationship with adjacent organs")
DEFAULT_FILE_NAME = "quality.toml"


@dataclass(frozen=True)
class Tolerances:
    """Tolerances of the checks (docs/quality.md); HU in HU, lengths in mm, ratios without unit."""

    hu_abs: float = DEFAULT.hu_abs
    iso_band_hu: float = DEFAULT.iso_band_hu
    min_inside_fraction: float = 0.9
    volume_ratio: tuple[float, float] = (0.3, 2.0)
    extent_ratio: tuple[float, float] = DEFAULT.extent_ratio
    max_components: int = 1
    max_changed_outside_voxels: int = 0
    shell_mm: float = DEFAULT.shell_mm
    disabled: tuple[str, ...] = field(default_factory=tuple)
    fail_attributes: tuple[str, ...] = DEFAULT_FAIL_ATTRIBUTES

    @property
    def thresholds(self) -> Thresholds:
        """The description's thresholds with this gate's iso band, shell, HU and extent tolerances."""
        return replace(DEFAULT, hu_abs=self.hu_abs, iso_band_hu=self.iso_band_hu, shell_mm=self.shell_mm,
                       extent_ratio=self.extent_ratio)

    def with_overrides(self, **values: Any) -> "Tolerances":
        """A copy with the given (non-None) values replaced, checked again."""
        return check_tolerances(replace(self, **{key: value for key, value in values.items() if value is not None}))

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for the summary JSON."""
        return {item.name: (list(value) if isinstance(value := getattr(self, item.name), tuple) else value)
                for item in fields(self)}


def _number(name: str, value: Any, minimum: float = 0.0, integer: bool = False) -> float | int:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or (not math.isinf(value) and value < minimum):
        noun = "an integer" if integer else "a number"
        raise ConfigError(f"tolerances.{name}: must be {noun} >= {minimum}, got {value!r}")
    return value


def _range(name: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"tolerances.{name}: must be two numbers [low, high], got {value!r}")
    low, high = (_number(name, item) for item in value)
    if low > high:
        raise ConfigError(f"tolerances.{name}: low {low} is above high {high}")
    return float(low), float(high)


def check_tolerances(tolerances: Tolerances) -> Tolerances:
    """Validate every value; returns the tolerances (ranges as float tuples) or raises ConfigError naming the key."""
    for name in ("hu_abs", "iso_band_hu", "min_inside_fraction", "shell_mm"):
        _number(name, getattr(tolerances, name))
    for name in ("max_components", "max_changed_outside_voxels"):
        _number(name, getattr(tolerances, name), integer=True)
    if tolerances.shell_mm <= 0:
        raise ConfigError(f"tolerances.shell_mm: must be above 0 mm, got {tolerances.shell_mm!r}")
    disabled = tuple(tolerances.disabled)
    unknown = [name for name in disabled if name not in CHECKS]
    if unknown:
        raise ConfigError(f"tolerances.disabled: unknown check(s) {unknown}; checks: {', '.join(CHECKS)}")
    fail_attributes = tuple(tolerances.fail_attributes)
    unknown = [name for name in fail_attributes if name not in ATTRIBUTES]
    if unknown:
        raise ConfigError(f"tolerances.fail_attributes: unknown attribute(s) {unknown}; attributes: "
                          f"{', '.join(ATTRIBUTES)}")
    return replace(tolerances, volume_ratio=_range("volume_ratio", tolerances.volume_ratio),
                   extent_ratio=_range("extent_ratio", tolerances.extent_ratio), disabled=disabled,
                   fail_attributes=fail_attributes)


def tolerances_from_mapping(values: Mapping[str, Any], source: str = "tolerances") -> Tolerances:
    """:class:`Tolerances` from a mapping of the names above; ConfigError naming ``source`` for unknown keys."""
    known = {item.name for item in fields(Tolerances)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown tolerance(s) {unknown}; known: {sorted(known)}")
    return check_tolerances(Tolerances(**dict(values)))


def load_tolerances(path: str | os.PathLike) -> Tolerances:
    """Read the ``[tolerances]`` table of a TOML file (docs/quality.md); ConfigError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: tolerance file not found")
    try:
        table = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as error:
        raise ConfigError(f"{path}: not a valid TOML file ({error})") from None
    extra = sorted(set(table) - {"tolerances"})
    if extra:
        raise ConfigError(f"{path}: unknown table(s) {extra}; the settings go under [tolerances]")
    return tolerances_from_mapping(table.get("tolerances", {}), source=str(path))


def resolve_tolerances(exp_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Tolerances:
    """Tolerances from ``path`` when given, else from ``EXP_DIR/quality.toml`` when present, else the defaults."""
    if path is not None:
        return load_tolerances(path)
    local = Path(exp_dir) / DEFAULT_FILE_NAME
    return load_tolerances(local) if local.is_file() else Tolerances()
