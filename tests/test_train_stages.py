"""End to end through ``python main.py`` (a subprocess, started from a folder other than pipeline/): each stage
(VQ, LMNet, LINet) trains a few steps on phantoms with the tiny demo configs and writes ``last.ckpt``, an
``epoch=`` checkpoint, the config copies and a preview PNG; ``--resume`` continues steps, EMA and optimiser."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from demo.make_phantoms import make_phantoms

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "pipeline" / "main.py"
DEMO_CONFIGS = ROOT / "pipeline" / "configs" / "demo"
KINDS = {"vq": ("image", "label"), "lmnet": ("image", "label", "type", "seg", "coarseg"),
         "linet": ("image", "label", "type", "coarseg")}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working folder holding phantoms in ``data/``; runs go to ``logs/`` (relative paths on purpose)."""
    folder = tmp_path_factory.mktemp("training")
    make_phantoms(folder / "data", n=3, seed=0, shape=(32, 64, 64), progress=False)
    return folder


def data_overrides(stage: str) -> list[str]:
    """Relative list paths (resolved against the working folder), tiny crops, two batches per epoch."""
    items = []
    for split, prefix in (("train", "train"), ("validation", "val")):
        items += [f"data.params.{split}.params.{kind}_list=data/{prefix}_{kind}_list.txt" for kind in KINDS[stage]]
        items += [f"data.params.{split}.params.crop_shape=[8,16,16]",
                  f"data.params.{split}.params.iter_num={2 if split == 'train' else 1}"]
    return items


def run_main(workdir: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(MAIN), *argv], cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"main.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def train(workdir: Path, stage: str, name: str, *extra: str) -> Path:
    run_main(workdir, "--base", str(DEMO_CONFIGS / f"{stage}.yaml"), "-t", "--name", name, "--logdir", "logs",
             "--max_steps", "3", "lightning.callbacks.image_logger.params.log_first_step=true",
             "lightning.callbacks.image_logger.params.background=false", *data_overrides(stage), *extra)
    return workdir / "logs" / name


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def check_run(run: Path, steps: int) -> dict:
    """Checks the run folder layout and returns its last checkpoint."""
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and "epoch=000000.ckpt" in checkpoints, checkpoints
    configs = sorted(p.name for p in (run / "configs").iterdir())
    assert len(configs) == 2 and configs[0].endswith("-lightning.yaml") and configs[1].endswith("-project.yaml")
    pngs = list((run / "images" / "train").glob("gs-*_b-000000_0.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 1000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    checkpoint = load(run / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == steps
    return checkpoint


def test_vq_then_linet_on_the_trained_vq(workdir):
    vq_run = train(workdir, "vq", "vq")
    vq = check_run(vq_run, steps=3)
    assert vq["vq_generator_steps"] == 3
    project = OmegaConf.load(next((vq_run / "configs").glob("*-project.yaml")))
    assert project.data.params.train.params.image_list == str(workdir / "data" / "train_image_list.txt")
    assert "lightning" not in project

    linet_run = train(workdir, "linet", "linet",
                      "model.params.first_stage_config.params.ckpt_path=logs/vq/checkpoints/last.ckpt")
    linet = check_run(linet_run, steps=3)
    for key, value in vq["state_dict"].items():
        if not key.startswith("loss."):
            torch.testing.assert_close(linet["state_dict"][f"first_stage_model.{key}"], value, rtol=0, atol=0)
    assert int(linet["state_dict"]["model_ema.num_updates"]) == 3


def test_lmnet_trains_and_resume_continues_exactly(workdir):
    run = train(workdir, "lmnet", "lmnet", "model.params.fg_loss_weight=3")
    first = check_run(run, steps=3)
    project = OmegaConf.load(next((run / "configs").glob("*-project.yaml")))
    assert project.model.params.fg_loss_weight == 3

    result = run_main(workdir, "--resume", "logs/lmnet", "--max_steps", "5")
    assert "Restored all states" in result.stdout + result.stderr
    resumed = load(run / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 5
    assert int(resumed["state_dict"]["model_ema.num_updates"]) == 5
    assert resumed["optimizer_states"][0]["state"][0]["step"] == 5
    assert len(list((run / "configs").glob("*-project.yaml"))) in (1, 2)  # one per start (same second: one)
    changed = [key for key in first["state_dict"] if key.startswith("model.")
               and not torch.equal(first["state_dict"][key], resumed["state_dict"][key])]
    assert changed, "the resumed run kept training"
