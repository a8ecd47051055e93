"""The report vocabulary: the synonym groups of ``pipeline/description.json`` plus the ``cavity`` groups.

A report value is one or more vocabulary phrases, each followed by a comma (``"round-like,protrusion into the
lumen,"``), lower case; ``specific features`` may be empty. Matching ignores case, spacing and the commas between
phrases, and always takes the longest phrase first, so phrases that contain a comma themselves
(``"irregular,wall thickening"``) are recognised whole.

``cavity`` is not in ``description.json``: as the original preprocess did, it is added here. It says where the
lesion box goes (see :mod:`preprocessing.bbox`): a hollow organ takes one of the first group, a solid organ one
of the second.
"""
from __future__ import annotations

import difflib
import json
from functools import lru_cache

from ldm.data.attributes import HOLLOW_CAVITIES, SOLID_CAVITIES
from ldm.errors import DataError
from ldm.util import PIPELINE_DIR

DESCRIPTION_FILE = PIPELINE_DIR / "description.json"
CAVITY = "cavity"
# Attributes that may list several phrases; the others describe one property and take exactly one phrase.
MULTI_VALUED = frozenset({"shape", "surface characteristics", "specific features"})
MAY_BE_EMPTY = frozenset({"specific features"})


class VocabularyError(DataError):
    """A report value is not made of vocabulary phrases; the message names the attribute and the allowed phrases."""


def clean_phrase(text: str) -> str:
    """Lower case, single spaces, no surrounding commas or spaces: ``" Enhanced CT, "`` -> ``"enhanced ct"``."""
    return " ".join(str(text).lower().split()).strip(", ")


@lru_cache(maxsize=None)
def vocabulary() -> dict[str, tuple[tuple[str, ...], ...]]:
    """Attribute -> synonym groups of cleaned phrases (``description.json`` order, then ``cavity``)."""
    with open(DESCRIPTION_FILE) as handle:
        table = json.load(handle)
    groups = {name: tuple(tuple(clean_phrase(p) for p in group) for group in value) for name, value in table.items()}
    groups[CAVITY] = (HOLLOW_CAVITIES, SOLID_CAVITIES)
    return groups


def attributes() -> tuple[str, ...]:
    """The attributes that take vocabulary phrases, in vocabulary order (``cavity`` last)."""
    return tuple(vocabulary())


def phrases(attribute: str, hollow: bool | None = None) -> tuple[str, ...]:
    """All phrases of ``attribute``; for ``cavity`` only the organ kind's group when ``hollow`` is given."""
    if attribute not in vocabulary():
        raise VocabularyError(f"{attribute!r} is not a report attribute (known: {', '.join(attributes())})")
    groups = vocabulary()[attribute]
    if attribute == CAVITY and hollow is not None:
        groups = (groups[0],) if hollow else (groups[1],)
    return tuple(phrase for group in groups for phrase in group)


def group_index(attribute: str, phrase: str) -> int:
    """Index of the synonym group that holds ``phrase`` (e.g. density ``"low density lesion"`` -> 0)."""
    wanted = clean_phrase(phrase)
    for index, group in enumerate(vocabulary()[attribute]):
        if wanted in group:
            return index
    raise VocabularyError(f"{attribute}: {phrase!r} is not a vocabulary phrase")


def split_phrases(attribute: str, value: str, hollow: bool | None = None) -> list[str]:
    """The vocabulary phrases a report value is made of, in order, without repeats.

    Raises VocabularyError naming the attribute, the unknown part and the allowed phrases.
    """
    if not isinstance(value, str):
        raise VocabularyError(f"{attribute}: expected a string of phrases, got {type(value).__name__} {value!r}")
    allowed = phrases(attribute, hollow)
    by_length = sorted(allowed, key=len, reverse=True)
    text = " ".join(value.lower().split())
    found: list[str] = []
    position = 0
    while True:
        while position < len(text) and text[position] in ", ":
            position += 1
        if position >= len(text):
            return found
        for phrase in by_length:
            end = position + len(phrase)
            if text.startswith(phrase, position) and (end == len(text) or text[end] in ", "):
                if phrase not in found:
                    found.append(phrase)
                position = end
                break
        else:
            unknown = text[position:].split(",")[0].strip()
            if attribute == CAVITY and unknown in phrases(CAVITY):
                kind, other = ("hollow", "solid") if hollow else ("solid", "hollow")
                raise VocabularyError(f"cavity: {unknown!r} is for {other} organs; for this {kind} organ use one of "
                                      f"{', '.join(repr(p) for p in allowed)}")
            close = difflib.get_close_matches(unknown, allowed, n=2)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            raise VocabularyError(
                f"{attribute}: {unknown!r} is not in the vocabulary; {hint}allowed: {', '.join(repr(p) for p in allowed)}"
            )


def canonical_value(attribute: str, value: str, hollow: bool | None = None) -> str:
    """A report value checked against the vocabulary and written canonically: phrases each followed by a comma.

    ``hollow`` restricts ``cavity`` to the organ kind's group. Raises VocabularyError for unknown phrases, an empty
    value (except ``specific features``) or several phrases for a single-valued attribute.
    """
    found = split_phrases(attribute, value, hollow)
    if not found and attribute not in MAY_BE_EMPTY:
        allowed = ", ".join(repr(p) for p in phrases(attribute, hollow))
        raise VocabularyError(f"{attribute}: empty value; choose one of {allowed}")
    if len(found) > 1 and attribute not in MULTI_VALUED:
        raise VocabularyError(f"{attribute}: takes one phrase, got {len(found)} ({', '.join(repr(p) for p in found)})")
    return "".join(f"{phrase}," for phrase in found)


def vocabulary_for_prompt(hollow: bool) -> dict[str, list[list[str]]]:
    """The vocabulary as the LLM sees it: synonym groups per attribute; ``cavity`` holds the organ kind's phrases,
    one group each (they are alternatives, not synonyms)."""
    table = {name: [list(group) for group in groups] for name, groups in vocabulary().items()}
    table[CAVITY] = [[phrase] for phrase in (HOLLOW_CAVITIES if hollow else SOLID_CAVITIES)]
    return table
