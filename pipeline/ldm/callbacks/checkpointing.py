"""Emergency ``last.ckpt`` saves: on SIGUSR1 (once the current batch is complete) and when ``fit`` raises.

Both write from global rank 0 only and without the barrier that ends ``Trainer.save_checkpoint``: a signal may
reach one rank only, and an exception leaves the other ranks elsewhere, so a barrier would hang the run.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from ldm.fileio import atomic_path


def save_checkpoint_now(trainer: pl.Trainer, path: str | os.PathLike) -> Path | None:
    """Write the full training state (weights, EMA, optimisers, loop counters, callbacks) to ``path`` atomically.

    Only global rank 0 writes (DDP keeps the weights identical on every rank). Returns the path written, or
    None on other ranks.
    """
    if not trainer.is_global_zero:
        return None
    path = Path(path)
    # The connector's dump is what Trainer.save_checkpoint writes, minus the trailing barrier (module docstring).
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    with atomic_path(path) as temporary:
        trainer.strategy.save_checkpoint(checkpoint, temporary)
    return path


class CheckpointOnSignal(pl.Callback):
    """On ``signum`` (SIGUSR1 by default) save ``path`` once the current training batch has finished.

    The handler only sets a flag (saving inside a signal handler could catch the optimiser mid-step); a handler
    installed before (e.g. Lightning's SLURM requeue) is still called. Send the signal to rank 0 (or to all).
    """

    def __init__(self, path: str | os.PathLike, signum: int | None = None):
        self.path = Path(path)
        self.signum = signum if signum is not None else getattr(signal, "SIGUSR1", None)
        self.requested = False
        self._previous = None
        self._installed = False

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if callable(self._previous):
            self._previous(signum, frame)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed after Lightning's own handlers (registered just before training) so that they are chained.
        if self.signum is None or threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.getsignal(self.signum)
        signal.signal(self.signum, self._handle)
        self._installed = True

    def _save_if_requested(self, trainer: pl.Trainer) -> None:
        if self.requested:
            self.requested = False
            if save_checkpoint_now(trainer, self.path) is not None:
                rank_zero_info(f"Signal {self.signum}: saved {self.path} at global step {trainer.global_step}")

    # Saved between batches: callbacks' on_train_batch_end runs before the model's own (the EMA update), so
    # the start of the next batch, or the end of the epoch, is the first point where a batch is complete.
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._save_if_requested(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_if_requested(trainer)

    def _uninstall(self) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._uninstall()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._uninstall()


class CheckpointOnException(pl.Callback):
    """When ``fit`` raises (a KeyboardInterrupt included) after at least one training batch of this run, save
    ``path``; Lightning then re-raises. Failures before the first batch save nothing, so they never replace a
    good ``last.ckpt`` with an untrained or half-restored model."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.trained = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self.trained = True

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.trained and save_checkpoint_now(trainer, self.path) is not None:
            rank_zero_info(f"{type(exception).__name__} during training: saved {self.path} at global step "
                           f"{trainer.global_step}")
