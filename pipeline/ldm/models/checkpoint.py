"""Loading released or self-trained checkpoints into our modules, strictly, with the original's ``ignore_keys``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from ldm.errors import MissingWeightsError

# Keys that the original *test-time* modules carry (an LPIPS metric) and no training checkpoint needs.
TEST_ONLY_PREFIXES = ("perceptual.",)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint (or a bare state dict) at ``path``, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch.load raises many types for a damaged file
        raise MissingWeightsError(f"{path}: cannot read the checkpoint ({type(error).__name__}: {error})") from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise MissingWeightsError(f"{path}: not a checkpoint (expected a dict with a 'state_dict' of tensors)")
    return dict(state)


def _shape(value) -> tuple | None:
    """Shape of a tensor entry; ``None`` for the non-tensor extra state a module may store."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _matches(key: str, prefixes: Iterable[str]) -> bool:
    return any(key.startswith(prefix) for prefix in prefixes)


def load_weights(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    ignore_keys: Iterable[str] = (),
    strict: bool = True,
    source: str = "checkpoint",
) -> tuple[list[str], list[str]]:
    """Load ``state`` into ``module``; keys starting with an ``ignore_keys`` prefix are neither loaded nor required.

    Strict by default: any other missing or unexpected key, or a shape mismatch, raises MissingWeightsError that
    lists them. Returns ``(missing, unexpected)``: the keys that were skipped (only ignored ones when strict).
    """
    ignore = tuple(ignore_keys)
    wanted = {k: v for k, v in state.items() if not _matches(k, ignore) and not _matches(k, TEST_ONLY_PREFIXES)}
    own = module.state_dict()
    missing = [k for k in own if k not in wanted and not _matches(k, ignore)]
    unexpected = [k for k in wanted if k not in own]
    ignored_missing = [k for k in own if k not in state and _matches(k, ignore)]
    ignored_unexpected = [k for k in state if k not in own and _matches(k, ignore)]
    mismatched = [f"{k} {_shape(v)} vs {_shape(own[k])}" for k, v in wanted.items() if k in own and _shape(v) != _shape(own[k])]
    if strict and (missing or unexpected or mismatched):
        details = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
                details.append(f"{title}: {shown}")
        raise MissingWeightsError(f"{source}: does not fit the model ({'; '.join(details)})")
    compatible = {k: v for k, v in wanted.items() if k in own and _shape(v) == _shape(own[k])}
    module.load_state_dict(compatible, strict=False)
    return missing + ignored_missing, unexpected + ignored_unexpected


def load_checkpoint(
    module: nn.Module, path: str | os.PathLike, ignore_keys: Iterable[str] = (), strict: bool = True
) -> tuple[list[str], list[str]]:
    """Read the checkpoint at ``path`` and load it into ``module`` (see :func:`load_weights`)."""
    return load_weights(module, read_state_dict(path), ignore_keys=ignore_keys, strict=strict, source=str(path))
