"""The attribute file: one JSON object per line, one line per CT (blank lines skipped).

Each object needs ``"organ type"`` (a TotalSegmentator v1 organ name, e.g. ``"liver"``, ``"kidney left"``) and
``"lesion type"`` (free text, e.g. ``"cyst"``, ``"tumor"``, ``"stone"``). Any report attribute may be fixed as
well (``shape``, ``density``, ``cavity``, ``CT value``, ``size`` ...): fixed values always override the reporter.
Vocabulary attributes are checked against ``description.json`` (plus ``cavity``); ``null`` means "not fixed".
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm.data.organs import is_hollow, organ_id, organ_name
from ldm.errors import DataError
from preprocessing.report_format import CT_VALUE, LOCATION, SIZE, parse_ct_value, parse_size
from ldm.data.vocabulary import attributes as vocabulary_attributes
from ldm.data.vocabulary import canonical_value

ORGAN_TYPE = "organ type"
LESION_TYPE = "lesion type"


@dataclass
class CaseAttributes:
    """One line of the attribute file, checked. ``fixed``: canonical user values that override the reporter."""

    organ_id: int
    organ_name: str
    hollow: bool
    lesion_type: str
    fixed: dict[str, Any] = field(default_factory=dict)


def allowed_keys() -> tuple[str, ...]:
    """Keys an attribute line may hold."""
    return (ORGAN_TYPE, LESION_TYPE, *vocabulary_attributes(), CT_VALUE, SIZE, LOCATION)


def read_attribute_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """The non-blank lines of the attribute file as ``(line number, text)``; DataError when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: attribute file not found")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the attribute file ({error})") from None
    return [(number, line.strip()) for number, line in enumerate(lines, start=1) if line.strip()]


def parse_attribute_line(text: str, where: str) -> dict[str, Any]:
    """The JSON object of one line; DataError naming ``where`` (file and line) otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object such as {{\"organ type\": \"liver\", \"lesion type\": \"cyst\"}}")
    return value


def interpret_attributes(raw: dict[str, Any], where: str) -> CaseAttributes:
    """Check one attribute object and normalise the fixed values; DataError naming ``where`` and the key."""
    unknown = [key for key in raw if key not in allowed_keys()]
    if unknown:
        raise DataError(f"{where}: unknown attribute {unknown[0]!r}; allowed keys: {', '.join(allowed_keys())}")
    for key in (ORGAN_TYPE, LESION_TYPE):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise DataError(f"{where}: {key!r} is required and must be a non-empty string")
    try:
        organ = organ_id(raw[ORGAN_TYPE])
    except DataError as error:
        raise DataError(f"{where}: {error}") from None
    hollow = is_hollow(organ)
    fixed: dict[str, Any] = {}
    try:
        for key in vocabulary_attributes():
            if raw.get(key) is not None:
                fixed[key] = canonical_value(key, raw[key], hollow=hollow)
        if raw.get(CT_VALUE) is not None:
            fixed[CT_VALUE] = parse_ct_value(raw[CT_VALUE])
        if raw.get(SIZE) is not None:
            fixed[SIZE] = parse_size(raw[SIZE])
    except DataError as error:
        raise DataError(f"{where}: {error}") from None
    location = raw.get(LOCATION)
    if location is not None and str(location).strip().rstrip(",") not in (str(organ), organ_name(organ)):
        raise DataError(f"{where}: 'lesion location' {location!r} contradicts 'organ type' {raw[ORGAN_TYPE]!r} (id {organ})")
    return CaseAttributes(organ, organ_name(organ), hollow, " ".join(raw[LESION_TYPE].split()), fixed)
