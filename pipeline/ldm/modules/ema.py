"""Exponential moving average of a model's parameters, stored as buffers under the original checkpoint names."""
from __future__ import annotations

import torch
from torch import nn


class LitEma(nn.Module):
    """EMA shadow of ``model``'s trainable parameters.

    Buffer names follow the original release: the parameter name with every dot removed
    (``input_blocks.0.0.weight`` -> ``input_blocks00weight``), plus ``decay`` (float) and ``num_updates`` (int32),
    so published checkpoints load key for key. With ``use_num_updates`` the effective decay is
    ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (a short warm-up).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.name_map: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer(
            "num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int32)
        )
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                shadow_name = name.replace(".", "")
                self.name_map[name] = shadow_name
                self.register_buffer(shadow_name, parameter.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update from the current parameters of ``model``."""
        decay = float(self.decay)
        if int(self.num_updates) >= 0:
            self.num_updates += 1
            count = int(self.num_updates)
            decay = min(decay, (1 + count) / (10 + count))
        shadows = dict(self.named_buffers())
        for name, parameter in model.named_parameters():
            if name in self.name_map:
                shadow = shadows[self.name_map[name]]
                shadow.lerp_(parameter.detach().to(shadow.dtype), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters with the EMA weights."""
        shadows = dict(self.named_buffers())
        for name, parameter in model.named_parameters():
            if name in self.name_map:
                parameter.copy_(shadows[self.name_map[name]])

    def store(self, parameters) -> None:
        """Keep a copy of ``parameters`` so :meth:`restore` can put them back after EMA evaluation."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters) -> None:
        """Put back the parameters saved by :meth:`store`."""
        for saved, parameter in zip(self.collected_params, parameters):
            parameter.copy_(saved)
        self.collected_params = []
