"""``ImageLogger``: preview montages of training batches at a fixed cadence (see :mod:`ldm.previews`).

Every ``batch_frequency`` training batches (counted across epochs and resumes) global rank 0 takes the first
``max_images`` items of the batch, asks the model for named volumes and writes
``<run>/images/train/gs-<global step>_e-<epoch>_b-<batch>_<item>.png`` (and, with ``save_nifti``, the volumes).
Models provide ``preview(batch, steps, generator) -> {name: [B, 1, D, H, W] tensor}`` (the diffusion models sample
with ``sample_steps`` DDIM steps); an autoencoder (``image_key`` + ``forward``) gets input and reconstruction.
The key ``mask`` is outlined on every row instead of drawn. The cost on the training loop is the sampling
only: PNG/NIfTI writing runs in a background thread, and a preview due while the previous one is still being
written is skipped.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import pytorch_lightning as pl
import torch

from ldm.errors import ConfigError
from ldm.previews import render_montage, write_preview_volumes

logger = logging.getLogger(__name__)
MASK_KEY = "mask"


def take_items(batch: Mapping[str, Any], count: int) -> dict[str, Any]:
    """The first ``count`` items of a collated batch (tensors and lists are sliced along their first axis)."""
    return {key: value[:count] if isinstance(value, (torch.Tensor, list, tuple)) else value
            for key, value in batch.items()}


@torch.no_grad()
def autoencoder_preview(model: pl.LightningModule, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``{input, reconstruction, mask}`` for an autoencoder: ``model(x)[0]`` is the reconstruction, the mask is
    the lesion (label 2) when the batch has a ``label``."""
    image = model.get_input(batch, model.image_key)
    volumes = {"input": image, "reconstruction": model(image)[0]}
    label = batch.get("label")
    if isinstance(label, torch.Tensor):
        label = label if label.dim() == image.dim() else label.unsqueeze(1)
        volumes[MASK_KEY] = (label == 2).float()
    return volumes


class ImageLogger(pl.Callback):
    """Writes preview PNGs of training batches (module docstring).

    ``batch_frequency``: training batches between previews (0 disables them); ``log_first_step``: also preview
    the very first batch; ``sample_steps``: sampler steps for diffusion models; ``max_images``: items per batch;
    ``save_nifti``: also write the volumes; ``seed``: sampler noise seed (plus the global step);
    ``background``: write files in a background thread.
    """

    def __init__(self, batch_frequency: int = 1000, log_first_step: bool = False, sample_steps: int = 10,
                 max_images: int = 1, save_nifti: bool = False, seed: int = 0, background: bool = True):
        if int(batch_frequency) < 0 or int(sample_steps) < 1 or int(max_images) < 1:
            raise ConfigError("lightning.callbacks.image_logger.params: batch_frequency must be >= 0, sample_steps "
                              f"and max_images >= 1 (got {batch_frequency}, {sample_steps}, {max_images})")
        self.batch_frequency = int(batch_frequency)
        self.log_first_step = bool(log_first_step)
        self.sample_steps = int(sample_steps)
        self.max_images = int(max_images)
        self.save_nifti = bool(save_nifti)
        self.seed = int(seed)
        self.background = bool(background)
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def is_due(self, batch_index: int) -> bool:
        """Whether the training batch with this index (0-based, across epochs) gets a preview."""
        if self.batch_frequency == 0:
            return False
        return batch_index % self.batch_frequency == 0 and (batch_index > 0 or self.log_first_step)

    def volumes(self, pl_module: pl.LightningModule, batch: Mapping[str, Any], step: int) -> dict[str, torch.Tensor]:
        """Named preview volumes ``[b, 1, D, H, W]`` on the CPU for the first ``max_images`` items of ``batch``."""
        items = take_items(batch, self.max_images)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed + step)
        if hasattr(pl_module, "preview"):
            volumes = pl_module.preview(items, steps=self.sample_steps, generator=generator)
        elif hasattr(pl_module, "image_key") and hasattr(pl_module, "get_input"):
            volumes = autoencoder_preview(pl_module, items)
        else:
            raise ConfigError(f"ImageLogger: {type(pl_module).__name__} has no preview(batch, steps, generator) method")
        return {name: volume.detach().float().cpu() for name, volume in volumes.items()}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        batch_index = trainer.fit_loop.total_batch_idx
        if not trainer.is_global_zero or not self.is_due(batch_index):
            return
        if self._pending is not None:
            if not self._pending.done():
                logger.info("ImageLogger: previous preview still being written; skipping batch %d", batch_index)
                return
            self._report(self._pending)
        was_training = pl_module.training
        pl_module.eval()
        try:
            volumes = self.volumes(pl_module, batch, trainer.global_step)
        finally:
            pl_module.train(was_training)
        stem = f"gs-{trainer.global_step:06d}_e-{trainer.current_epoch:04d}_b-{batch_index:06d}"
        directory = Path(trainer.default_root_dir) / "images" / "train"
        if self.background:
            self._executor = self._executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="previews")
            self._pending = self._executor.submit(self.write, volumes, directory, stem)
        else:
            self.write(volumes, directory, stem)

    def write(self, volumes: Mapping[str, torch.Tensor], directory: Path, stem: str) -> list[Path]:
        """Write one PNG (and NIfTI files with ``save_nifti``) per item; returns the PNG paths."""
        mask = volumes.get(MASK_KEY)
        shown = {name: volume for name, volume in volumes.items() if name != MASK_KEY}
        written = []
        for item in range(next(iter(shown.values())).shape[0]):
            item_volumes = {name: volume[item] for name, volume in shown.items()}
            item_mask = mask[item] if mask is not None else None
            written.append(render_montage(item_volumes, directory / f"{stem}_{item}.png", mask=item_mask,
                                          title=f"{stem} item {item}"))
            if self.save_nifti:
                extra = {MASK_KEY: item_mask} if item_mask is not None else {}
                write_preview_volumes({**item_volumes, **extra}, directory / "nifti", f"{stem}_{item}")
        return written

    def _report(self, pending: Future) -> None:
        """Wait for a background write; its error is logged, not raised: a lost PNG must not end a long run."""
        error = pending.exception()
        if error is not None:
            logger.error("ImageLogger: writing a preview failed: %s: %s", type(error).__name__, error)
        self._pending = None

    def flush(self) -> None:
        """Wait for the preview being written and stop the writer thread."""
        if self._pending is not None:
            self._report(self._pending)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.flush()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.flush()
