"""Turning a batch of lesion attribute dicts into one context vector per attribute.

Every conditioning encoder shares this contract (original-pipeline.md §2.7): a batch is a list of samples, each
sample a dict ``{attribute name: phrase}`` (values are used in insertion order) or a list of phrases. Samples
shorter than the longest one are padded with ``''`` entries, as the original BiomedCLIP wrapper did, and every
phrase becomes one vector, giving a context ``[B, n_attributes, output_dim]``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ldm.errors import DataError

PAD_PHRASE = ""


def attribute_phrases(batch: Sequence[Mapping[str, str] | Sequence[str]]) -> tuple[list[list[str]], torch.Tensor]:
    """Return the padded phrase lists of a batch and a bool mask ``[B, n]`` (True = a real attribute).

    ``n`` is the length of the longest sample, at least 1 so that the context always has a token; entries added
    only to pad a sample are ``''`` and False in the mask. An attribute whose own value is ``''`` stays True.
    """
    if isinstance(batch, (str, Mapping)) or not isinstance(batch, Sequence) or len(batch) == 0:
        raise DataError("attribute batch: expected a non-empty list of dicts or lists of strings, "
                        f"got {type(batch).__name__}")
    samples = []
    for index, sample in enumerate(batch):
        if isinstance(sample, Mapping):
            items = list(sample.items())
        elif isinstance(sample, Sequence) and not isinstance(sample, str):
            items = list(enumerate(sample))
        else:
            raise DataError(f"attribute batch, sample {index}: expected a dict or a list of strings, "
                            f"got {type(sample).__name__}")
        for key, value in items:
            if not isinstance(value, str):
                raise DataError(f"attribute batch, sample {index}, attribute {key!r}: expected a string, "
                                f"got {type(value).__name__} ({value!r})")
        samples.append([value for _, value in items])
    length = max(1, max(len(phrases) for phrases in samples))
    mask = torch.zeros(len(samples), length, dtype=torch.bool)
    for row, phrases in enumerate(samples):
        mask[row, : len(phrases)] = True
        phrases.extend([PAD_PHRASE] * (length - len(phrases)))
    return samples, mask


class AttributeEncoder(nn.Module):
    """Base class: subclasses implement ``encode_phrases`` (a flat list of strings -> ``[N, output_dim]``)."""

    def __init__(self, output_dim: int):
        super().__init__()
        self.output_dim = int(output_dim)

    @property
    def device(self) -> torch.device:
        """The device of the module's parameters (where contexts are produced)."""
        return next(self.parameters()).device

    def encode_phrases(self, phrases: list[str]) -> torch.Tensor:
        """Return one vector per phrase, ``[len(phrases), output_dim]``, on the module's device."""
        raise NotImplementedError

    def encode_with_mask(self, batch: Sequence[Mapping[str, str] | Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(context [B, n, output_dim], mask [B, n] bool)``; the mask is False on padding entries."""
        samples, mask = attribute_phrases(batch)
        flat = [phrase for phrases in samples for phrase in phrases]
        unique = list(dict.fromkeys(flat))
        vectors = self.encode_phrases(unique)
        position = {phrase: index for index, phrase in enumerate(unique)}
        order = torch.tensor([position[phrase] for phrase in flat], device=vectors.device)
        context = vectors.index_select(0, order).reshape(len(samples), mask.shape[1], vectors.shape[-1])
        return context, mask.to(vectors.device)

    def forward(self, batch: Sequence[Mapping[str, str] | Sequence[str]]) -> torch.Tensor:
        """Return the context ``[B, n_attributes, output_dim]`` (padding entries encode ``''``)."""
        return self.encode_with_mask(batch)[0]

    def encode(self, batch: Sequence[Mapping[str, str] | Sequence[str]]) -> torch.Tensor:
        """Same as ``forward`` (the name the diffusion classes call)."""
        return self(batch)
