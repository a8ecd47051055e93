"""The run directory: created, and the merged configs written, by global rank 0 only.

Layout: ``<run>/checkpoints/`` (temporary files of a checkpoint write that a kill interrupted are removed
here), ``<run>/configs/<time>-project.yaml`` (model and data),
``<run>/configs/<time>-lightning.yaml`` (the ``lightning`` block), ``<run>/images/``. Other ranks neither
create nor delete anything (the original's non-zero ranks moved the shared directory away, racing rank 0).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_info

from ldm.callbacks.checkpointing import remove_partial_writes
from ldm.fileio import write_text_atomic

RUN_SUBDIRS = ("checkpoints", "configs", "images")


class SetupCallback(pl.Callback):
    """Creates the run directory and saves the configs of this (possibly resumed) run, on rank 0."""

    def __init__(self, run_dir: str | os.PathLike, config: DictConfig, resumed: bool = False):
        self.run_dir = Path(run_dir)
        self.config = config
        self.resumed = resumed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        for name in RUN_SUBDIRS:
            (self.run_dir / name).mkdir(parents=True, exist_ok=True)
        for leftover in remove_partial_writes(self.run_dir / "checkpoints"):
            rank_zero_info(f"Removed {leftover.name}, a checkpoint write interrupted by a kill")
        stamp = time.strftime("%Y%m%dT%H%M%S")
        project = OmegaConf.masked_copy(self.config, [key for key in self.config if key != "lightning"])
        lightning = OmegaConf.create({"lightning": self.config.get("lightning", {})})
        configs = self.run_dir / "configs"
        write_text_atomic(configs / f"{stamp}-project.yaml", OmegaConf.to_yaml(project))
        write_text_atomic(configs / f"{stamp}-lightning.yaml", OmegaConf.to_yaml(lightning))
        rank_zero_info(f"{'Resuming' if self.resumed else 'Starting'} run in {self.run_dir} "
                       f"(configs saved as configs/{stamp}-*.yaml)")
