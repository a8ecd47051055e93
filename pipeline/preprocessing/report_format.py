"""The structured report (``type.json``) that preprocessing writes and training reads, and what a reporter is given.

Format (original-pipeline §1.2)::

    {"<v1 organ id>": [shape, "", {attributes}, [[[organ bbox size X, Y, Z]], [[lesion size X, Y, Z]]]]}

Attributes in the original order: ``enhancement status``, ``lesion location`` (the organ id), ``shape``,
``size`` (``"[[a b c]] pixel,"``), ``density``, ``density variations``, ``CT value`` (``"Mean density of the
lesion region is approximately <n> HU,"``), ``surface characteristics``, ``relationship with adjacent organs``,
``specific features``, ``cavity``. Sizes are voxel counts along the axes of the standardised (LPS) CT file:
X = file axis 0 (right -> left), Y = axis 1 (anterior -> posterior), Z = axis 2 (inferior -> superior).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ldm.errors import DataError

SIZE = "size"
CT_VALUE = "CT value"
LOCATION = "lesion location"
ATTRIBUTE_ORDER = (
    "enhancement status", LOCATION, "shape", SIZE, "density", "density variations", CT_VALUE,
    "surface characteristics", "relationship with adjacent organs", "specific features", "cavity",
)
HU_RANGE = (-1024, 3071)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class ReportError(DataError):
    """A report (from the LLM, the offline sampler or the user) is invalid; the message says what to change."""


@dataclass
class ReportRequest:
    """Everything a reporter needs for one case.

    ``organ_extent_xyz``: organ bounding-box size in voxels (X, Y, Z); ``spacing_xyz_mm``: voxel size in mm;
    ``fixed``: the user's attributes (canonical phrases, ``CT value`` as int HU, ``size`` as (X, Y, Z) voxels),
    which always win; ``organ_mean_hu``: mean HU inside the organ; ``contrast_enhanced``: whether the CT looks
    contrast-enhanced (None when unknown); ``size_problem(size_xyz, cavity)``: None when lesion boxes of that
    size can be placed with that cavity (and fit ``max_size_xyz``), else the reason; ``max_size_xyz``: the
    largest lesion size (voxels, X, Y, Z) the inference crops hold with the blend rim, None for no bound.
    """

    organ_id: int
    organ_name: str
    hollow: bool
    lesion_type: str
    organ_extent_xyz: tuple[int, int, int]
    spacing_xyz_mm: tuple[float, float, float]
    fixed: dict[str, Any] = field(default_factory=dict)
    organ_mean_hu: float | None = None
    contrast_enhanced: bool | None = None
    size_problem: Callable[[tuple[int, int, int], str], str | None] = lambda size, cavity: None
    max_size_xyz: tuple[int, int, int] | None = None


def size_bound_problem(size_xyz: Sequence[int], max_size_xyz: Sequence[int] | None) -> str | None:
    """Why a lesion of ``size_xyz`` voxels exceeds ``max_size_xyz`` (the inference crops' capacity), or None."""
    if max_size_xyz is None or all(int(s) <= int(m) for s, m in zip(size_xyz, max_size_xyz)):
        return None
    return (f"larger than {[int(m) for m in max_size_xyz]} voxels (X, Y, Z), the largest lesion the inference crops "
            "hold with the blend rim at this voxel size")


def format_size(size_xyz: Sequence[int]) -> str:
    """``(28, 29, 26)`` -> ``"[[28 29 26]] pixel,"`` (the numpy print of the original)."""
    return f"[[{' '.join(str(int(s)) for s in size_xyz)}]] pixel,"


def format_ct_value(hu: float) -> str:
    """``57`` -> ``"Mean density of the lesion region is approximately 57 HU,"``."""
    return f"Mean density of the lesion region is approximately {int(round(hu))} HU,"


def parse_ct_value(value: Any, what: str = CT_VALUE) -> int:
    """A mean lesion density in HU from a number, ``"57"``, ``"57 HU"`` or the report sentence; ReportError otherwise."""
    if isinstance(value, bool):
        raise ReportError(f"{what}: expected a number of HU, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        numbers = _NUMBER.findall(str(value))
        if len(numbers) != 1:
            raise ReportError(f"{what}: expected one number of HU (e.g. 'approximately 45 HU,'), got {value!r}")
        number = float(numbers[0])
    if not HU_RANGE[0] <= number <= HU_RANGE[1]:
        raise ReportError(f"{what}: {number:g} HU is outside the CT range {HU_RANGE[0]}..{HU_RANGE[1]}")
    return int(round(number))


def parse_size(value: Any, what: str = SIZE) -> tuple[int, int, int]:
    """A lesion size (X, Y, Z) in voxels from ``[a, b, c]``, ``[[a, b, c]]`` or ``"[[a b c]] pixel,"``."""
    if isinstance(value, str):
        numbers = _NUMBER.findall(value)
    else:
        numbers = value
        while isinstance(numbers, (list, tuple)) and len(numbers) == 1 and isinstance(numbers[0], (list, tuple)):
            numbers = numbers[0]
    if not isinstance(numbers, (list, tuple)) or len(numbers) != 3:
        raise ReportError(f"{what}: expected three voxel counts [X, Y, Z], got {value!r}")
    size = []
    for number in numbers:
        if isinstance(number, bool):
            raise ReportError(f"{what}: expected three positive integers [X, Y, Z], got {value!r}")
        try:
            as_float = float(number)
        except (TypeError, ValueError):
            raise ReportError(f"{what}: expected three positive integers [X, Y, Z], got {value!r}") from None
        if as_float != int(as_float) or as_float < 1:
            raise ReportError(f"{what}: expected three positive integers [X, Y, Z], got {value!r}")
        size.append(int(as_float))
    return tuple(size)


def check_size_fits(size_xyz: Sequence[int], organ_extent_xyz: Sequence[int], organ_name: str) -> None:
    """ReportError when the lesion is larger than the organ's bounding box along any axis."""
    if any(s > e for s, e in zip(size_xyz, organ_extent_xyz)):
        raise ReportError(
            f"size {list(size_xyz)} voxels does not fit in the {organ_name}, whose extent is "
            f"{list(organ_extent_xyz)} voxels (X, Y, Z): every entry must be at most the organ's"
        )


def build_report(organ_id: int, attributes: Mapping[str, Any], organ_extent_xyz: Sequence[int],
                 lesion_size_xyz: Sequence[int]) -> dict[str, list]:
    """The ``type.json`` dict. ``attributes``: canonical phrases per vocabulary attribute plus ``CT value`` (HU)."""
    values = dict(attributes)
    values[LOCATION] = str(int(organ_id))
    values[SIZE] = format_size(lesion_size_xyz)
    values[CT_VALUE] = format_ct_value(values[CT_VALUE])
    ordered = {name: values[name] for name in ATTRIBUTE_ORDER}
    bboxes = [[[int(e) for e in organ_extent_xyz]], [[int(s) for s in lesion_size_xyz]]]
    return {str(int(organ_id)): [ordered["shape"], "", ordered, bboxes]}


def check_fixed_size(request: ReportRequest) -> None:
    """ReportError when the user's fixed ``size`` does not fit in the organ or leaves no room for the boxes."""
    if SIZE not in request.fixed:
        return
    size = request.fixed[SIZE]
    check_size_fits(size, request.organ_extent_xyz, request.organ_name)
    problem = request.size_problem(size, request.fixed.get("cavity", ""))
    if problem is not None:
        raise ReportError(f"the fixed size {list(size)}: {problem}")
