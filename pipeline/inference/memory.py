"""GPU out-of-memory in one case: a message that says what happened, and a clean start for the next case.

A CUDA out-of-memory error raised while a case runs is recorded for that case alone (see
:meth:`inference.results.CaseResult.fail`); :func:`release_memory` then drops what the failed case left behind and
returns the allocator's cached blocks to the driver, so later cases start with the whole GPU again instead of
failing one after another.
"""
from __future__ import annotations

import gc
import re

import torch

SUGGESTION = ("try inference.precision=bf16, a smaller inference.crop_size, inference.vq_tiling=always or "
              "inference.vq_device=neighbour")


def is_out_of_memory(error: BaseException) -> bool:
    """True for a CUDA out-of-memory error."""
    return isinstance(error, torch.cuda.OutOfMemoryError)


def out_of_memory_message(case_id: str, error: BaseException) -> str:
    """One line naming the case and the allocation that failed (torch's "Tried to allocate 2.00 GiB")."""
    match = re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]i?B)", str(error))
    amount = match.group(1) if match else "an unknown amount"
    return (f"{case_id}: CUDA out of memory while trying to allocate {amount}; the memory was freed and the next "
            f"case starts clean; {SUGGESTION}")


def release_memory() -> None:
    """Collect unreachable objects (a failed case's tensors) and empty the CUDA cache (no-op without CUDA)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
