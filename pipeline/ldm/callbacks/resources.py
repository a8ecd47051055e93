"""Per-epoch wall time, training batches per second and peak memory, on any device (the original was CUDA-only)."""
from __future__ import annotations

import sys
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

MIB = 2**20


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window where the backend has one (CUDA, XPU); a no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "xpu":
        torch.xpu.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> tuple[float | None, str]:
    """``(MiB, what was measured)``: peak allocated tensor memory on CUDA/XPU since the last reset, memory the MPS
    driver holds now, or on the CPU the peak resident set size of this process (since it started). ``None`` where
    the platform offers no such number."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB, "cuda peak allocated"
    if device.type == "xpu":
        return torch.xpu.max_memory_allocated(device) / MIB, "xpu peak allocated"
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / MIB, "mps driver allocated"
    try:
        import resource
    except ImportError:  # Windows has no getrusage
        return None, "unavailable"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return (peak / MIB if sys.platform == "darwin" else peak / 1024), "process peak RSS"


class ResourceMonitor(pl.Callback):
    """Logs ``resources/epoch_time_s``, ``resources/batches_per_s`` and ``resources/peak_memory_mib`` (max over
    ranks) at the end of every training epoch and prints them on rank 0."""

    def __init__(self) -> None:
        self.epoch_start = 0.0
        self.batches = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run resumed mid-epoch continues that epoch without on_train_epoch_start: its timing starts here.
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reset_peak_memory(pl_module.device)
        self.epoch_start = time.monotonic()
        self.batches = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self.batches += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        elapsed = time.monotonic() - self.epoch_start
        memory, source = peak_memory_mib(pl_module.device)
        values = {"resources/epoch_time_s": elapsed, "resources/batches_per_s": self.batches / max(elapsed, 1e-9)}
        if memory is not None:
            values["resources/peak_memory_mib"] = memory
        for name, value in values.items():
            pl_module.log(name, float(value), on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max",
                          batch_size=1)
        memory_text = f", {memory:.0f} MiB ({source})" if memory is not None else ""
        rank_zero_info(f"Epoch {trainer.current_epoch}: {elapsed:.1f} s, {self.batches} batches "
                       f"({values['resources/batches_per_s']:.2f}/s){memory_text}")
