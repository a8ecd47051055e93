"""The boxes (lesions) of one case through the UNet in batches, with the results of sampling them one by one.

A box's UNet call depends on the boxes before it only through its **basis**, the part of its inputs that an
earlier box can change: LMNet's cavity phrase (the cavity rule counts earlier lesions touching the box's
one-voxel shell as inside; a report with its own ``cavity`` makes the phrase fixed) and LINet's CT crop (the CT
as inpainted so far). Everything else of the call (conditioning volume, organ, box, latent mask, text, seed)
is fixed per box; the steps after the call (LMNet's threshold away from earlier lesions, its further attempts,
LINet's paste) run in box order with the volume as it is then, exactly as one by one.

So :class:`BoxWaves` samples a **wave** of consecutive boxes as one batch: box ``k`` (whose turn it is) and the
boxes after it that no box of the wave before them can reach (``independent``: LMNet's box grown by one voxel,
LINet's crop, against the earlier boxes' write regions), at most ``batch_size``. Each item draws its noise from
its own generator, seeded as it is alone. When a later box's turn comes its basis is taken again from the
volume as it is then; when it differs from the one it was sampled with (a rule reached further than the
geometric test says) the box is sampled again alone, so outputs never depend on the batching (up to fp32
rounding of batched convolutions).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ldm.errors import LesionDiffusionError
from ldm.util import make_generator

Basis = Any  # a numpy array (compared value by value) or a hashable value such as a string


@dataclass(frozen=True)
class ItemInputs:
    """One box's ``model.sample`` call: its batch-1 positional tensors (``None`` allowed) and its seed."""

    tensors: tuple[torch.Tensor | None, ...]
    seed: int


def same_basis(first: Basis, second: Basis) -> bool:
    """True when two bases are equal (arrays: same shape and values, NaN equal to NaN)."""
    if isinstance(first, np.ndarray) or isinstance(second, np.ndarray):
        first, second = np.asarray(first), np.asarray(second)
        floating = np.issubdtype(first.dtype, np.floating) and np.issubdtype(second.dtype, np.floating)
        return first.shape == second.shape and bool(np.array_equal(first, second, equal_nan=floating))
    return first == second


def slices_meet(first: Sequence[slice], second: Sequence[slice], margin: Sequence[int] = (0, 0, 0)) -> bool:
    """True when the boxes ``first`` grown by ``margin`` voxels on each side and ``second`` share a voxel."""
    return all(a.start - m < b.stop and b.start < a.stop + m for a, b, m in zip(first, second, margin))


def _group_key(item: ItemInputs) -> tuple:
    return tuple(None if tensor is None else (tuple(tensor.shape), tensor.dtype, tensor.device)
                 for tensor in item.tensors)


def sample_items(model: torch.nn.Module, items: Sequence[ItemInputs], **settings: Any) -> list[torch.Tensor]:
    """``model.sample`` for ``items`` (items of the same shapes as one batch, each with its own generator);
    returns one ``[1, ...]`` sample per item. One item is sampled with its generator itself, as one by one."""
    groups: dict[tuple, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(_group_key(item), []).append(index)
    samples: list[torch.Tensor | None] = [None] * len(items)
    for members in groups.values():
        tensors = [None if items[members[0]].tensors[position] is None
                   else torch.cat([items[index].tensors[position] for index in members])
                   for position in range(len(items[members[0]].tensors))]
        generators = [make_generator(items[index].seed) for index in members]
        batch = model.sample(*tensors, generator=generators[0] if len(members) == 1 else generators, **settings)
        for row, index in enumerate(members):
            samples[index] = batch[row:row + 1]
    return samples


class BoxWaves:
    """The first UNet sample of each box of a case, sampled in waves (module docstring).

    ``count``: boxes, in the order they are processed; ``independent(i, j)``: True when box ``i`` (earlier) can
    not change the basis of box ``j``; ``basis(j)``: box ``j``'s basis from the volume as it is now;
    ``prepare(j, basis)``: its :class:`ItemInputs`; ``sample(items)``: the samples of several items
    (:func:`sample_items` with the stage's settings). ``basis`` and ``prepare`` may raise a
    :class:`LesionDiffusionError` for a bad box: a wave then ends before it and the error comes at its turn."""

    def __init__(self, count: int, batch_size: int, independent: Callable[[int, int], bool],
                 basis: Callable[[int], Basis], prepare: Callable[[int, Basis], ItemInputs],
                 sample: Callable[[Sequence[ItemInputs]], list[torch.Tensor]]):
        self._count, self._batch_size = count, max(1, int(batch_size))
        self._independent, self._basis, self._prepare, self._sample = independent, basis, prepare, sample
        self._ahead: dict[int, tuple[Basis, torch.Tensor]] = {}
        self.wave_sizes: list[int] = []
        self.resampled: list[int] = []

    def sample(self, items: Sequence[ItemInputs]) -> list[torch.Tensor]:
        """The samples of ``items`` with the stage's settings, outside any wave (e.g. a box's further draws)."""
        return self._sample(items)

    def first_sample(self, index: int, basis: Basis) -> torch.Tensor:
        """The first sample of box ``index`` (its turn: every earlier box applied), whose basis now is ``basis``."""
        ahead = self._ahead.pop(index, None)
        if ahead is not None:
            sampled_basis, sample = ahead
            if same_basis(sampled_basis, basis):
                return sample
            self.resampled.append(index)
            return self._sample([self._prepare(index, basis)])[0]
        wave, items, bases = [index], [self._prepare(index, basis)], [basis]
        for later in range(index + 1, min(self._count, index + self._batch_size)):
            if not all(self._independent(earlier, later) for earlier in wave):
                break
            try:
                later_basis = self._basis(later)
                item = self._prepare(later, later_basis)
            except LesionDiffusionError:
                break
            wave.append(later)
            items.append(item)
            bases.append(later_basis)
        samples = self._sample(items)
        self.wave_sizes.append(len(wave))
        for later, later_basis, sample in zip(wave[1:], bases[1:], samples[1:]):
            self._ahead[later] = (later_basis, sample)
        return samples[0]
