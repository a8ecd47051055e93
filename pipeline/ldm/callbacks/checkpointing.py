"""``last.ckpt`` always holds the latest complete training state (weights, EMA, optimisers, loop counters).

:class:`LastCheckpoint` writes it every ``every_n_train_steps`` optimiser steps (independent of validation), at the
end of ``fit``, on SIGUSR1 (what SLURM sends before the time limit; training goes on, and under SLURM the job is
requeued), on SIGTERM (Lightning stops at the end of the batch and this callback saves before the process exits)
and when ``fit`` raises after the first training batch. Every write goes to a temporary file that then replaces
``last.ckpt`` in one rename: a process killed while writing leaves the previous ``last.ckpt`` intact.

Writes come from global rank 0 only and without the barrier that ends ``Trainer.save_checkpoint``: a signal may
reach one rank only, and an exception leaves the other ranks elsewhere, so a barrier could hang the run. DDP keeps
the weights identical on every rank, so rank 0's state is the run's state.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.errors import ConfigError
from ldm.fileio import atomic_path

TEMPORARY_PATTERN = ".*.tmp*"  # what ldm.fileio.temporary_sibling names a file being written


def write_checkpoint(checkpoint: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` the checkpoint straight into a temporary sibling of ``path``, flush it to disk, then rename it
    to ``path``. Lightning's own checkpoint IO first serialises into memory and copies that buffer (twice the
    checkpoint in RAM, 3x the time for the release LINet: bench/checkpoint_write.py)."""
    path = Path(path)
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())  # a node failure after the rename must not leave an empty last.ckpt
    return path


def save_checkpoint_now(trainer: pl.Trainer, path: str | os.PathLike) -> Path | None:
    """Write the full training state to ``path`` atomically; returns the path written, or None on other ranks."""
    if not trainer.is_global_zero:
        return None
    # The connector's dump is what Trainer.save_checkpoint writes, minus the trailing barrier (module docstring).
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        return write_checkpoint(checkpoint, path)
    with atomic_path(path) as temporary:  # a checkpoint IO plugin the user configured
        trainer.strategy.save_checkpoint(checkpoint, temporary)
    return Path(path)


def remove_partial_writes(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that a process killed while writing a checkpoint left in ``directory``;
    returns what was removed. Call it only before this run writes there itself."""
    removed = []
    for leftover in Path(directory).glob(TEMPORARY_PATTERN):
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes for this SLURM job (``<array job>_<task>`` for an array task), or None
    outside SLURM."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


class LastCheckpoint(pl.Callback):
    """Keeps ``path`` (``<run>/checkpoints/last.ckpt``) the latest training state (module docstring).

    ``every_n_train_steps``: optimiser steps between saves (0: only at the end, on signals and errors).
    ``requeue``: after a SIGUSR1 save, global rank 0 runs ``scontrol requeue <job id>`` (set it under SLURM).
    Saves happen between batches: callbacks' ``on_train_batch_end`` runs before the model's own (the EMA update),
    so the start of the next batch, the end of the epoch or the end of training is the first point at which a
    batch is complete.
    """

    def __init__(self, path: str | os.PathLike, every_n_train_steps: int = 0, requeue: bool = False,
                 signum: int | None = None):
        if int(every_n_train_steps) < 0:
            raise ConfigError(f"every_n_train_steps must be >= 0 (0 = only at the end), got {every_n_train_steps}")
        self.path = Path(path)
        self.every_n_train_steps = int(every_n_train_steps)
        self.requeue = bool(requeue)
        self.signum = signum if signum is not None else getattr(signal, "SIGUSR1", None)
        self.signal_received = False
        self.trained = False
        self.saved_step: int | None = None
        self._previous = None
        self._installed = False

    def save(self, trainer: pl.Trainer, reason: str) -> None:
        """Write ``last.ckpt`` now (rank 0) and remember the step so the same state is not written twice."""
        start = time.perf_counter()
        if save_checkpoint_now(trainer, self.path) is not None:
            rank_zero_info(f"{reason}: saved {self.path} at global step {trainer.global_step} "
                           f"({time.perf_counter() - start:.1f} s)")
        self.saved_step = trainer.global_step

    def is_due(self, global_step: int) -> bool:
        """Whether a multiple of ``every_n_train_steps`` was reached since the last save. A crossed multiple counts
        too: models with several optimisers (the VQ-GAN) advance the global step by more than one per batch."""
        if self.every_n_train_steps <= 0:
            return False
        return global_step // self.every_n_train_steps > (self.saved_step or 0) // self.every_n_train_steps

    def _handle(self, signum, frame) -> None:
        # Only a flag: saving inside a signal handler could catch the optimiser mid-step.
        self.signal_received = True
        if callable(self._previous):
            self._previous(signum, frame)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.saved_step = trainer.global_step  # a resumed run's state is already on disk
        # Installed after Lightning's own handlers (registered just before training) so that they are chained.
        if self.signum is None or threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.getsignal(self.signum)
        signal.signal(self.signum, self._handle)
        self._installed = True

    def _between_batches(self, trainer: pl.Trainer) -> None:
        if self.signal_received:
            self.signal_received = False
            self.save(trainer, f"Signal {self.signum}")
            if self.requeue:
                self._requeue(trainer)
        elif self.is_due(trainer.global_step):
            self.save(trainer, f"Every {self.every_n_train_steps} steps")

    def _requeue(self, trainer: pl.Trainer) -> None:
        job = slurm_job_id()
        if not trainer.is_global_zero or job is None:
            return
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode == 0:
            rank_zero_info(f"Requeued SLURM job {job}: it continues from {self.path} when it starts again")
        else:
            rank_zero_warn(f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._between_batches(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self.trained = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._between_batches(trainer)

    def _uninstall(self) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._uninstall()
        if self.trained and trainer.global_step != self.saved_step:
            self.save(trainer, "End of training")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Save once a batch of this run has completed: failures before it never replace a good ``last.ckpt``
        with an untrained or half-restored model. Lightning re-raises afterwards."""
        self._uninstall()
        if not self.trained or trainer.global_step == self.saved_step:
            return
        reason = "SIGTERM" if isinstance(exception, SIGTERMException) else f"{type(exception).__name__} in training"
        self.save(trainer, reason)
