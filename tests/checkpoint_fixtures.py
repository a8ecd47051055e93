"""Builders shared by the checkpoint tests (no tests here): models from our configs, saved the way Lightning saves
them (``Trainer.save_checkpoint``: loops, callbacks, optimiser list, and ``hyper_parameters`` as an OmegaConf
object with its ``hparams_type``), as the original release files were."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from ldm.util import PIPELINE_DIR, instantiate_from_config, load_config


def model_config(config_file: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The ``model`` block of a config under ``pipeline/configs`` with its weight files unset."""
    config = load_config([PIPELINE_DIR / "configs" / config_file], ["model.params.ckpt_path=null", *overrides])
    return config.model


def save_like_lightning(model: pl.LightningModule, path: Path, hyper_parameters: DictConfig) -> Path:
    """Save ``model`` with ``Trainer.save_checkpoint``, ``hyper_parameters`` kept as an OmegaConf object."""
    model.save_hyperparameters(hyper_parameters)
    trainer = pl.Trainer(logger=False, accelerator="cpu", devices=1, enable_progress_bar=False,
                         enable_model_summary=False, max_steps=1)
    trainer.strategy.connect(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    return path


def build_and_save(config_file: str, path: Path, overrides: Sequence[str] = (), seed: int = 0) -> Path:
    """Build the model of ``config_file`` (random weights, seeded) and save it the Lightning way at ``path``."""
    torch.manual_seed(seed)
    block = model_config(config_file, overrides)
    model = instantiate_from_config(block, key_path="model")
    return save_like_lightning(model, path, block.params)
