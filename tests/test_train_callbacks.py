"""Training callbacks and preview montages: PNG/NIfTI previews, the preview cadence, SIGUSR1 and exception
checkpoints (real Trainer, tiny LMNet on phantoms), and the device-agnostic memory measurement. Step checkpoints,
SIGTERM, SLURM and resume: test_train_resume.py."""
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from matplotlib.image import imread

import main
from ldm.util import instantiate_from_config, load_config
from ldm.callbacks import ImageLogger
from ldm.callbacks.resources import peak_memory_mib
from ldm.data.volume import read_volume
from ldm.previews import lesion_centre, orthogonal_slices, render_montage

ROOT = Path(__file__).resolve().parents[1]
LMNET = ROOT / "pipeline" / "configs" / "demo" / "lmnet.yaml"
LINET = ROOT / "pipeline" / "configs" / "demo" / "linet.yaml"
KINDS = ("image", "label", "type", "seg", "coarseg")


class SignalAt(pl.Callback):
    """Sends SIGUSR1 to this process at the end of training batch ``batch``."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.fit_loop.total_batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGUSR1)


class CopyLastAt(pl.Callback):
    """Copies ``last.ckpt`` to ``at-batch-<batch>.ckpt`` at the start of training batch ``batch`` (after any save of
    that boundary: callbacks from the config run after main.py's own)."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.fit_loop.total_batch_idx == self.batch:
            directory = Path(trainer.default_root_dir) / "checkpoints"
            shutil.copyfile(directory / "last.ckpt", directory / f"at-batch-{self.batch}.ckpt")


class RaiseAt(pl.Callback):
    """Raises RuntimeError('boom') at the end of training batch ``batch`` (-1: when training starts)."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_start(self, trainer, pl_module):
        if self.batch < 0:
            raise RuntimeError("boom before training")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.fit_loop.total_batch_idx == self.batch:
            raise RuntimeError("boom")


def lmnet_argv(phantoms: Path, logdir: Path, *extra: str) -> list[str]:
    argv = ["-b", str(LMNET), "-l", str(logdir), "-n", "run", "--logger", "none",
            "lightning.callbacks.image_logger=null", "lightning.modelcheckpoint.params.every_n_train_steps=0",
            "lightning.trainer.num_sanity_val_steps=0", "lightning.trainer.enable_progress_bar=false"]
    for split, prefix in (("train", "train"), ("validation", "val")):
        argv += [f"data.params.{split}.params.{kind}_list={phantoms}/{prefix}_{kind}_list.txt" for kind in KINDS]
        argv.append(f"data.params.{split}.params.crop_shape=[8,16,16]")
    return argv + list(extra)


def test_lesion_centre_and_slices():
    mask = np.zeros((9, 12, 14), np.float32)
    mask[2:5, 6:9, 10:13] = 1
    assert lesion_centre(mask, mask.shape) == (3, 7, 11)
    assert lesion_centre(np.zeros_like(mask), mask.shape) == (4, 6, 7)
    assert lesion_centre(None, mask.shape) == (4, 6, 7)
    volume = np.arange(9 * 12 * 14, dtype=np.float32).reshape(9, 12, 14)
    slices = orthogonal_slices(volume, (3, 7, 11))
    assert {k: v.shape for k, v in slices.items()} == {"axial": (12, 14), "coronal": (9, 14), "sagittal": (9, 12)}
    np.testing.assert_array_equal(slices["axial"], volume[3])
    np.testing.assert_array_equal(slices["coronal"], volume[:, 7])
    np.testing.assert_array_equal(slices["sagittal"], volume[:, :, 11])


def red_pixels(path: Path) -> int:
    image = imread(path)
    return int(((image[..., 0] > 0.8) & (image[..., 1] < 0.4) & (image[..., 2] < 0.4)).sum())


def test_montage_outlines_the_mask_and_is_written_atomically(tmp_path):
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 12, 24, 24, generator=generator)
    mask = torch.zeros(1, 12, 24, 24)
    mask[:, 4:8, 8:16, 10:18] = 1
    with_mask = render_montage({"input": image, "sample": image * 0.5}, tmp_path / "a.png", mask=mask, title="t")
    without = render_montage({"input": image, "sample": image * 0.5}, tmp_path / "b.png")
    assert with_mask == tmp_path / "a.png" and imread(with_mask).shape[0] > imread(with_mask).shape[1] * 0.5
    assert red_pixels(with_mask) > 50 and red_pixels(without) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]
    with pytest.raises(ValueError, match="share one shape"):
        render_montage({"input": image}, tmp_path / "c.png", mask=mask[..., :5])


def test_image_logger_cadence_and_files(tmp_path):
    logger = ImageLogger(batch_frequency=5, log_first_step=False)
    assert [i for i in range(16) if logger.is_due(i)] == [5, 10, 15]
    assert [i for i in range(7) if ImageLogger(batch_frequency=5, log_first_step=True).is_due(i)] == [0, 5]
    assert not any(ImageLogger(batch_frequency=0, log_first_step=True).is_due(i) for i in range(5))

    volumes = {"input": torch.rand(2, 1, 6, 8, 8), "sample": torch.rand(2, 1, 6, 8, 8),
               "mask": (torch.rand(2, 1, 6, 8, 8) > 0.5).float()}
    written = ImageLogger(save_nifti=True).write(volumes, tmp_path, "gs-000003")
    assert [p.name for p in written] == ["gs-000003_0.png", "gs-000003_1.png"]
    assert all(p.is_file() for p in written)
    array, _ = read_volume(tmp_path / "nifti" / "gs-000003_1_sample.nii.gz")
    np.testing.assert_allclose(array, volumes["sample"][1, 0].numpy(), atol=1e-6)
    assert (tmp_path / "nifti" / "gs-000003_0_mask.nii.gz").is_file()


def test_peak_memory_on_the_cpu():
    memory, source = peak_memory_mib(torch.device("cpu"))
    assert source == "process peak RSS" and 10 < memory < 1e6


def test_sigusr1_saves_last_checkpoint_after_the_current_batch(phantoms, tmp_path):
    argv = lmnet_argv(phantoms, tmp_path, "--max_steps", "4",
                      "lightning.callbacks.signal.target=test_train_callbacks.SignalAt",
                      "lightning.callbacks.signal.params.batch=1",
                      "lightning.callbacks.copy.target=test_train_callbacks.CopyLastAt",
                      "lightning.callbacks.copy.params.batch=2")
    assert main.main(argv) == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoint = torch.load(checkpoints / "at-batch-2.ckpt", map_location="cpu", weights_only=False)
    # Signal at the end of batch 1 -> saved before batch 2 starts: 2 complete steps (EMA included); training goes on.
    assert checkpoint["global_step"] == 2
    assert int(checkpoint["state_dict"]["model_ema.num_updates"]) == 2
    assert checkpoint["optimizer_states"][0]["state"][0]["step"] == 2
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_exception_in_fit_saves_last_checkpoint_and_reraises(phantoms, tmp_path):
    argv = lmnet_argv(phantoms, tmp_path, "--max_steps", "5",
                      "lightning.callbacks.fail.target=test_train_callbacks.RaiseAt",
                      "lightning.callbacks.fail.params.batch=2")
    with pytest.raises(RuntimeError, match="boom"):
        main.main(argv)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3

    early = lmnet_argv(phantoms, tmp_path, "-n", "early", "--max_steps", "5",
                       "lightning.callbacks.fail.target=test_train_callbacks.RaiseAt",
                       "lightning.callbacks.fail.params.batch=-1")
    with pytest.raises(RuntimeError, match="boom before training"):
        main.main(early)
    assert not (tmp_path / "early" / "checkpoints" / "last.ckpt").exists()


def test_train_false_only_validates(phantoms, tmp_path, capsys):
    assert main.main(lmnet_argv(phantoms, tmp_path, "-t", "false")) == 0
    assert "val/loss_simple_ema" in capsys.readouterr().out
    assert not list((tmp_path / "run" / "checkpoints").glob("*.ckpt"))


def first_batch(config_path: Path, phantoms: Path, kinds: tuple[str, ...], *overrides: str):
    """The model of a demo config and one training batch of the phantoms (8 x 16 x 16 crops)."""
    items = [f"data.params.train.params.{kind}_list={phantoms}/train_{kind}_list.txt" for kind in kinds]
    config = load_config([config_path], items + ["data.params.train.params.crop_shape=[8,16,16]", *overrides])
    data = instantiate_from_config(config.data)
    return instantiate_from_config(config.model).eval(), next(iter(data.train_dataloader()))


@pytest.mark.parametrize("stage", ["lmnet", "linet"])
def test_model_previews(phantoms, stage):
    if stage == "lmnet":
        model, batch = first_batch(LMNET, phantoms, KINDS, "data.params.batch_size=2")
    else:  # a random first stage is enough to check the preview's plumbing
        model, batch = first_batch(LINET, phantoms, ("image", "label", "type", "coarseg"), "data.params.batch_size=2",
                                   "model.params.first_stage_config.params.ckpt_path=null")
    volumes = model.preview(batch, steps=2, generator=torch.Generator().manual_seed(3))
    again = model.preview(batch, steps=2, generator=torch.Generator().manual_seed(3))
    assert list(volumes) == ["input", "condition", "sample", "mask"]
    for name, volume in volumes.items():
        assert volume.shape == (2, 1, 8, 16, 16) and volume.device.type == "cpu", name
        torch.testing.assert_close(volume, again[name])
    mask = volumes["mask"]
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() > 0
    if stage == "lmnet":
        assert torch.all(volumes["input"] <= mask), "the lesion lies inside its box"
        torch.testing.assert_close(volumes["condition"], batch["target"].float())
    else:
        assert torch.all(volumes["condition"][mask > 0] == 0)
        torch.testing.assert_close(volumes["condition"][mask == 0], volumes["input"][mask == 0])
        torch.testing.assert_close(volumes["input"], batch["image"].float())
