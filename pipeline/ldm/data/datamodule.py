"""``DataModule``: the ``data:`` block of a config as a Lightning data module.

.. code-block:: yaml

    data:
      target: ldm.data.datamodule.DataModule
      params:
        batch_size: 2
        num_workers: 4
        train: {target: ldm.data.dataset.LesionDataset, params: {...}}
        validation: {target: ldm.data.dataset.LesionDataset, params: {...}}

Each of ``train``, ``validation``, ``test`` and ``predict`` is an optional ``{target, params}`` dataset block,
built with :func:`ldm.util.instantiate_from_config` the first time it is needed; only the loaders of the given
blocks exist (Lightning then skips e.g. validation when no ``validation`` block is given). Train and validation
loaders use ``batch_size``; test and predict loaders load whole volumes of different shapes and therefore use
batches of one case. All loaders collate with :meth:`LesionDataset.collate` (or the dataset's own ``collate``).

Under DDP, Lightning replaces each loader's sampler with a ``DistributedSampler`` (shuffled for training, as
``shuffle_train`` asks), so every rank sees its own share of the items; at test time the sampler pads the last
round with repeated cases. Each worker seeds numpy and ``random`` from its torch seed.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ldm.data.dataset import LesionDataset
from ldm.errors import ConfigError
from ldm.util import instantiate_from_config

SPLITS = ("train", "validation", "test", "predict")
STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",), "predict": ("predict",)}


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed (unique per worker)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class DataModule(pl.LightningDataModule):
    """Datasets and loaders for training, validation, testing and prediction, from config blocks."""

    def __init__(self, batch_size: int = 1, num_workers: int = 0, train: Mapping | None = None,
                 validation: Mapping | None = None, test: Mapping | None = None, predict: Mapping | None = None,
                 shuffle_train: bool = True, persistent_workers: bool = False) -> None:
        super().__init__()
        if int(batch_size) < 1 or int(num_workers) < 0:
            raise ConfigError(f"data: batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.shuffle_train, self.persistent_workers = bool(shuffle_train), bool(persistent_workers)
        self.configs = {name: block for name, block in zip(SPLITS, (train, validation, test, predict)) if block}
        if not self.configs:
            raise ConfigError("data: give at least one of train, validation, test, predict")
        self.datasets: dict[str, Dataset] = {}
        loaders = {"train": self._train_dataloader, "validation": self._val_dataloader,
                   "test": self._test_dataloader, "predict": self._predict_dataloader}
        hooks = {"train": "train_dataloader", "validation": "val_dataloader", "test": "test_dataloader",
                 "predict": "predict_dataloader"}
        # Only the loaders of configured splits are defined, so Lightning sees e.g. "no validation".
        for name in self.configs:
            setattr(self, hooks[name], loaders[name])

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` ('train', 'validation', 'test' or 'predict'), built on first use."""
        if split not in self.configs:
            raise ConfigError(f"data.{split}: no dataset configured for this split")
        if split not in self.datasets:
            self.datasets[split] = instantiate_from_config(self.configs[split], key_path=f"data.params.{split}")
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the Lightning ``stage`` needs (all configured ones when ``stage`` is None)."""
        for split in STAGE_SPLITS.get(stage, SPLITS):
            if split in self.configs:
                self.dataset(split)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        collate: Callable[[list], Any] = getattr(dataset, "collate", LesionDataset.collate)
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers, collate_fn=collate,
            worker_init_fn=seed_worker, persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def _train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, self.shuffle_train)

    def _val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.batch_size, False)

    def _test_dataloader(self) -> DataLoader:
        return self._loader("test", 1, False)

    def _predict_dataloader(self) -> DataLoader:
        return self._loader("predict", 1, False)
