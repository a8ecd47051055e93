"""Which synthetic cases a fold trains on when their number is capped (``--synthetic-per-real``).

One seeded order over all synthetic cases serves every fold, so the folds share most of their synthetic cases
and the exported dataset holds few that no fold uses. The order is balanced over lesion types: the cases of each
type are shuffled, then the types take turns (round robin, in a seeded order of the types), so any first ``n``
cases hold each type as evenly as the supply allows. A fold takes the first ``n`` cases it may train on.
"""
from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np

Case = TypeVar("Case")


def balanced_order(cases: Sequence[Case], seed: int) -> list[Case]:
    """``cases`` (objects with ``identifier`` and ``lesion_type``) in the seeded, type-balanced order above."""
    rng = np.random.default_rng(seed)
    by_type: dict[str, list[Case]] = {}
    for case in sorted(cases, key=lambda item: item.identifier):
        by_type.setdefault(case.lesion_type, []).append(case)
    queues = []
    for lesion_type in sorted(by_type):
        members = by_type[lesion_type]
        queues.append([members[i] for i in rng.permutation(len(members))])
    queues = [queues[i] for i in rng.permutation(len(queues))]
    order = []
    for position in range(max((len(queue) for queue in queues), default=0)):
        order.extend(queue[position] for queue in queues if position < len(queue))
    return order

