"""Mask helpers shared by the diffusion models: filled bounding boxes of binary masks, per sample."""
from __future__ import annotations

import torch


def filled_bbox(mask: torch.Tensor) -> torch.Tensor:
    """Per sample, the axis-aligned bounding box (inclusive min..max) of ``mask > 0`` filled with 1.

    ``mask`` is ``[B, C, *spatial]``; the box is taken over all channels and returned as ``[B, 1, *spatial]``
    (zeros for an empty mask), in ``mask``'s float dtype.
    """
    spatial = mask.shape[2:]
    boxes = torch.zeros((mask.shape[0], 1, *spatial), dtype=torch.float32, device=mask.device)
    occupied = (mask > 0).any(dim=1)
    for index in range(mask.shape[0]):
        coords = occupied[index].nonzero()
        if coords.numel() == 0:
            continue
        low, high = coords.min(dim=0).values, coords.max(dim=0).values
        region = tuple(slice(int(a), int(b) + 1) for a, b in zip(low, high))
        boxes[(index, 0) + region] = 1.0
    return boxes.to(mask.dtype if mask.is_floating_point() else torch.float32)
