"""An offline, trainable attribute encoder that needs no pretrained weights.

Each attribute phrase becomes one vector from the closed vocabulary the structured reports use
(``description.json`` synonym groups, the organ names of ``organ_type.json``, the cavity phrases), from numeric
features (``"57 HU"``, ``"[[28 29 26]] pixel"``), or, for anything else, from hashed word buckets. Phrases are
matched after lower-casing, collapsing whitespace and stripping trailing commas; a comma-separated phrase that is
not itself in the vocabulary (``"round-like,protrusion into the lumen,"``) is the mean of its parts.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.data.attributes import HOLLOW_CAVITIES, SOLID_CAVITIES
from ldm.errors import DataError
from ldm.modules.encoders.attributes import AttributeEncoder
from ldm.util import PIPELINE_DIR

NUMBER = r"(-?\d+(?:\.\d+)?)"
HU_PATTERN = re.compile(NUMBER + r"\s*hu\b")
SIZE_PATTERN = re.compile(r"\[\[\s*" + NUMBER + r"[\s,]+" + NUMBER + r"[\s,]+" + NUMBER + r"\s*\]\]")
PAD_INDEX = 0


def normalise_phrase(text: str) -> str:
    """Lower-case, ``_`` -> space, whitespace collapsed, no spaces around commas, no trailing ``, . ;``."""
    text = " ".join(text.lower().replace("_", " ").split())
    text = re.sub(r"\s*,\s*", ",", text)
    return text.strip(" ,.;")


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same in every process (unlike the salted built-in ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def sinusoidal_features(values: torch.Tensor, min_period: float, max_period: float, n_frequencies: int) -> torch.Tensor:
    """Return ``[..., 2 * n_frequencies]``: sin and cos of ``2 pi value / period`` for geometric periods.

    Values closer than the shortest period get nearly equal features; values further apart than the longest
    period get nearly orthogonal ones (each frequency pair has unit norm, so the feature norm is constant).
    """
    periods = torch.logspace(math.log10(min_period), math.log10(max_period), n_frequencies,
                             dtype=torch.float64, device=values.device)
    phase = 2 * math.pi * values.to(torch.float64).unsqueeze(-1) / periods
    return torch.cat([phase.sin(), phase.cos()], dim=-1).to(torch.float32)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: vocabulary file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None


def build_phrase_index(description_file: str | os.PathLike, organ_file: str | os.PathLike) -> dict[str, int]:
    """Return ``{normalised phrase: group row}``; synonyms share a row, row 0 is reserved for ``''``.

    Groups are numbered in file order: description.json groups, the cavity phrases, then one group per organ
    (its TotalSegmentator v1 id string is an alias of its name, as raw reports store the id).
    """
    description_path, organ_path = Path(description_file), Path(organ_file)
    description, organs = _read_json(description_path), _read_json(organ_path)
    groups: list[tuple[Path, list[str]]] = []
    if not isinstance(description, dict):
        raise DataError(f"{description_path}: expected {{attribute: [[synonym, ...], ...]}}")
    for attribute, attribute_groups in description.items():
        if not isinstance(attribute_groups, list) or not all(
                isinstance(group, list) and group and all(isinstance(p, str) for p in group)
                for group in attribute_groups):
            raise DataError(f"{description_path}: attribute {attribute!r} must be a list of lists of phrases")
        groups.extend((description_path, group) for group in attribute_groups)
    # Each cavity phrase is its own category.
    groups.extend((description_path, [phrase]) for phrase in HOLLOW_CAVITIES + SOLID_CAVITIES)
    if not isinstance(organs, dict) or not all(isinstance(name, str) for name in organs.values()):
        raise DataError(f"{organ_path}: expected {{id: organ name}}")
    groups.extend((organ_path, [name, organ_id]) for organ_id, name in organs.items())
    index: dict[str, int] = {}
    for row, (path, group) in enumerate(groups, start=1):
        for phrase in group:
            key = normalise_phrase(phrase)
            if key in index and index[key] != row:
                raise DataError(f"{path}: phrase {phrase!r} belongs to two different groups")
            index[key] = row
    return index


class VocabularyEncoder(AttributeEncoder):
    """Learned embeddings for the report vocabulary, numeric features for HU values and sizes, hashed fallback.

    Args:
        description_file: synonym groups (default ``pipeline/description.json``).
        organ_file: organ names by id (default ``pipeline/organ_type.json``).
        output_dim: size of each context vector.
        n_hash_buckets: rows of the fallback table for phrases outside the vocabulary.
        n_frequencies: sinusoidal frequencies per numeric value.
        hu_period_range: shortest and longest period of the HU features, in HU.
        size_period_range: shortest and longest period of the size features, in voxels.
    """

    def __init__(self, description_file: str | None = None, organ_file: str | None = None, output_dim: int = 512,
                 n_hash_buckets: int = 4096, n_frequencies: int = 32,
                 hu_period_range: tuple[float, float] = (16.0, 16000.0),
                 size_period_range: tuple[float, float] = (4.0, 4000.0)):
        super().__init__(output_dim)
        self.phrase_index = build_phrase_index(description_file or PIPELINE_DIR / "description.json",
                                               organ_file or PIPELINE_DIR / "organ_type.json")
        self.n_hash_buckets = int(n_hash_buckets)
        self.n_frequencies = int(n_frequencies)
        self.hu_period_range = tuple(float(p) for p in hu_period_range)
        self.size_period_range = tuple(float(p) for p in size_period_range)
        self.phrase_embedding = nn.Embedding(max(self.phrase_index.values()) + 1, output_dim)
        self.hash_embedding = nn.EmbeddingBag(self.n_hash_buckets, output_dim, mode="mean")
        self.hu_projection = nn.Linear(2 * n_frequencies, output_dim, bias=False)
        self.size_projection = nn.Linear(3 * 2 * n_frequencies, output_dim, bias=False)
        # Unit-variance outputs, like the embedding rows: each feature vector has squared norm n_frequencies
        # per value, so a weight std of 1/sqrt(that) keeps HU, size and phrase vectors on one scale.
        nn.init.normal_(self.hu_projection.weight, std=n_frequencies ** -0.5)
        nn.init.normal_(self.size_projection.weight, std=(3 * n_frequencies) ** -0.5)
        self._parts_cache: dict[str, list[tuple[str, Any]]] = {}

    def get_extra_state(self) -> dict[str, Any]:
        """Saved with the weights so a checkpoint keeps the phrase -> row map it was trained with."""
        return {"phrase_index": dict(self.phrase_index)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        index = state.get("phrase_index") if isinstance(state, dict) else None
        rows = self.phrase_embedding.num_embeddings
        if not isinstance(index, dict) or any(not 0 < row < rows for row in index.values()):
            raise DataError(f"VocabularyEncoder checkpoint: phrase map does not fit the {rows}-row phrase table")
        self.phrase_index = dict(index)
        self._parts_cache.clear()

    def hash_buckets(self, text: str) -> list[int]:
        """Fallback buckets of a normalised phrase: one for the whole phrase, one per word."""
        keys = [f"phrase:{text}"] + [f"word:{word}" for word in re.findall(r"[a-z0-9]+", text)]
        return [stable_hash(key) % self.n_hash_buckets for key in keys]

    def _part(self, text: str) -> tuple[str, Any]:
        if text in self.phrase_index:
            return "phrase", self.phrase_index[text]
        size = SIZE_PATTERN.search(text)
        if size:
            return "size", [float(value) for value in size.groups()]
        hu = HU_PATTERN.search(text)
        if hu:
            return "hu", float(hu.group(1))
        return "hash", self.hash_buckets(text)

    def parse(self, phrase: str) -> list[tuple[str, Any]]:
        """Return the parts a phrase is averaged from: ``(kind, payload)`` with kind phrase/size/hu/hash."""
        if phrase not in self._parts_cache:
            text = normalise_phrase(phrase)
            if text == "":
                parts = [("phrase", PAD_INDEX)]
            else:
                parts = [self._part(text)]
                pieces = [piece for piece in text.split(",") if piece]
                if parts[0][0] == "hash" and len(pieces) > 1:
                    parts = [self._part(piece) for piece in pieces]
            self._parts_cache[phrase] = parts
        return self._parts_cache[phrase]

    def encode_phrases(self, phrases: list[str]) -> torch.Tensor:
        """Return one vector per phrase, ``[len(phrases), output_dim]``: the mean of its parts' vectors."""
        device = self.device
        by_kind: dict[str, tuple[list[int], list[Any]]] = {kind: ([], []) for kind in ("phrase", "size", "hu", "hash")}
        for owner, phrase in enumerate(phrases):
            for kind, payload in self.parse(phrase):
                by_kind[kind][0].append(owner)
                by_kind[kind][1].append(payload)
        total = torch.zeros(len(phrases), self.output_dim, device=device, dtype=self.phrase_embedding.weight.dtype)
        counts = torch.zeros(len(phrases), device=device, dtype=total.dtype)
        for kind, (owners, payloads) in by_kind.items():
            if not owners:
                continue
            vectors = self._embed(kind, payloads, device)
            owner_index = torch.tensor(owners, device=device)
            total = total.index_add(0, owner_index, vectors.to(total.dtype))
            counts = counts.index_add(0, owner_index, torch.ones(len(owners), device=device, dtype=total.dtype))
        return total / counts.unsqueeze(-1)

    def _embed(self, kind: str, payloads: list[Any], device: torch.device) -> torch.Tensor:
        if kind == "phrase":
            return self.phrase_embedding(torch.tensor(payloads, device=device))
        if kind == "hash":
            flat = torch.tensor([bucket for buckets in payloads for bucket in buckets], device=device)
            offsets = torch.tensor([0] + [len(buckets) for buckets in payloads[:-1]], device=device).cumsum(0)
            return self.hash_embedding(flat, offsets)
        values = torch.tensor(payloads, device=device)
        if kind == "hu":
            features = sinusoidal_features(values, *self.hu_period_range, self.n_frequencies)
            return self.hu_projection(features.to(self.hu_projection.weight.dtype))
        features = sinusoidal_features(values, *self.size_period_range, self.n_frequencies)
        return self.size_projection(features.flatten(-2).to(self.size_projection.weight.dtype))
