"""Check a reporter's reply field by field and turn it into the canonical ``type.json`` dict.

Every problem found is listed in one ReportError message (so an LLM can fix them all in its next attempt):
the JSON itself, the organ key, the entry layout, each vocabulary attribute, the CT value and the lesion size
(positive integers, within the organ's extent, and room for the boxes under the chosen cavity). The user's fixed
attributes replace the reply's before checking, so they always win.
"""
from __future__ import annotations

import json
from typing import Any

from preprocessing.report_format import (CT_VALUE, SIZE, ReportError, ReportRequest, build_report, check_size_fits,
                                         parse_ct_value, parse_size)
from ldm.data.vocabulary import CAVITY, VocabularyError, canonical_value
from ldm.data.vocabulary import attributes as vocabulary_attributes

ENTRY_LAYOUT = '[shape, "", {attributes}, [[[organ X, Y, Z]], [[lesion X, Y, Z]]]]'


def extract_json(text: str) -> Any:
    """The JSON value in a reply, tolerating a Markdown code fence or words around one object."""
    body = text.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0]
    try:
        return json.loads(body)
    except json.JSONDecodeError as error:
        first, last = body.find("{"), body.rfind("}")
        if 0 <= first < last:
            try:
                return json.loads(body[first: last + 1])
            except json.JSONDecodeError:
                pass
        raise ReportError(f"the reply is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None


def _entry(data: Any, request: ReportRequest) -> tuple[list, dict]:
    key = str(request.organ_id)
    if not isinstance(data, dict):
        raise ReportError(f'the reply must be a JSON object {{"{key}": {ENTRY_LAYOUT}}}')
    if key not in data:
        raise ReportError(f'the top-level key must be "{key}" (the {request.organ_name}), got {list(data)[:3]}')
    entry = data[key]
    if not isinstance(entry, list) or len(entry) < 3 or not isinstance(entry[2], dict):
        raise ReportError(f'"{key}" must map to {ENTRY_LAYOUT}')
    return entry, entry[2]


def _lesion_size(entry: list, attributes: dict) -> tuple[int, int, int]:
    if len(entry) > 3:
        try:
            return parse_size(entry[3][1], what="the last element [[X, Y, Z]]")
        except (TypeError, IndexError, KeyError):
            raise ReportError(f"the last element must be [[[organ X, Y, Z]], [[lesion X, Y, Z]]], got {entry[3]!r}") from None
    if SIZE in attributes:
        return parse_size(attributes[SIZE])
    raise ReportError("the lesion size is missing: give [[X, Y, Z]] as the last element and in 'size'")


def validate_reply(text: str, request: ReportRequest) -> dict[str, list]:
    """The canonical report for a reply; ReportError listing every problem otherwise."""
    entry, reply = _entry(extract_json(text), request)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for name in vocabulary_attributes():
        if name in request.fixed:
            values[name] = request.fixed[name]
        elif name not in reply:
            problems.append(f"'{name}' is missing")
        else:
            try:
                values[name] = canonical_value(name, reply[name], hollow=request.hollow)
            except VocabularyError as error:
                problems.append(str(error))
    try:
        values[CT_VALUE] = request.fixed[CT_VALUE] if CT_VALUE in request.fixed else parse_ct_value(reply.get(CT_VALUE, ""))
    except ReportError as error:
        problems.append(str(error))
    size = request.fixed.get(SIZE)
    if size is None:
        try:
            size = _lesion_size(entry, reply)
            check_size_fits(size, request.organ_extent_xyz, request.organ_name)
            if CAVITY in values:
                problem = request.size_problem(size, values[CAVITY])
                if problem is not None:
                    raise ReportError(f"size {list(size)}: {problem}; choose a smaller size")
        except ReportError as error:
            problems.append(str(error))
    if problems:
        raise ReportError("; ".join(problems))
    return build_report(request.organ_id, values, request.organ_extent_xyz, size)
