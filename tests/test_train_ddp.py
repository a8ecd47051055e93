"""Two-process DDP on the CPU (gloo) under ``torchrun --standalone --nproc_per_node 2``: LMNet trains a few steps,
both ranks end with identical weights (UNet and EMA), rank 0's checkpoint holds them, the learning rate is
scaled by the world size, rank 0 samples a preview while rank 1 waits, and only rank 0 writes into the run
folder; then the run resumed under torchrun with ``--max_steps 5`` continues from step 3 on both ranks, and the
flag given now is recorded in the run's configs."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from demo.make_phantoms import make_phantoms

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "pipeline" / "main.py"
LMNET = ROOT / "pipeline" / "configs" / "demo" / "lmnet.yaml"
KINDS = ("image", "label", "type", "seg", "coarseg")


class DumpWeights(pl.Callback):
    """Each rank saves its final state dict and the items it trained on to ``<directory>/rank<r>.pt``."""

    def __init__(self, directory: str):
        self.directory = Path(directory)
        self.cases: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.cases += batch["image_path"]

    def on_train_end(self, trainer, pl_module):
        state = {key: value.detach().cpu().clone() for key, value in pl_module.state_dict().items()
                 if isinstance(value, torch.Tensor)}
        torch.save({"state_dict": state, "cases": self.cases, "world_size": trainer.world_size,
                    "learning_rate": pl_module.learning_rate},
                   self.directory / f"rank{trainer.global_rank}.pt")


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    make_phantoms(tmp_path / "data", n=5, seed=1, shape=(32, 64, 64), progress=False)
    overrides = []
    for split, prefix in (("train", "train"), ("validation", "val")):
        overrides += [f"data.params.{split}.params.{kind}_list=data/{prefix}_{kind}_list.txt" for kind in KINDS]
        overrides.append(f"data.params.{split}.params.crop_shape=[8,16,16]")
    # Cases in list order: the distributed sampler alone decides which rank trains on which case.
    overrides += ["data.params.train.params.random_sample=false", "data.params.train.params.iter_num=0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(MAIN)]
    command = [*torchrun, "--base", str(LMNET), "-t", "--name", "ddp", "--logdir", "logs", "--max_steps", "3",
               "lightning.callbacks.image_logger.params.log_first_step=true",
               "lightning.callbacks.image_logger.params.background=false",
               "lightning.callbacks.dump.target=test_train_ddp.DumpWeights",
               f"lightning.callbacks.dump.params.directory={tmp_path}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - start
    assert result.returncode == 0, \
        f"torchrun failed after {wall:.0f} s:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    print(f"2-process DDP run: {wall:.1f} s wall")

    ranks = [torch.load(tmp_path / f"rank{r}.pt", map_location="cpu", weights_only=False) for r in (0, 1)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    assert ranks[0]["learning_rate"] == ranks[1]["learning_rate"] == 2 * 1.0e-3   # configs/demo/lmnet.yaml, scaled by the world size
    assert len(ranks[0]["cases"]) == 3 and not set(ranks[0]["cases"][:2]) & set(ranks[1]["cases"][:2]), \
        "in an epoch the distributed sampler gives each rank its own cases"
    first, second = ranks[0]["state_dict"], ranks[1]["state_dict"]
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=f"{key} differs between ranks")

    checkpoint = torch.load(tmp_path / "logs" / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu",
                            weights_only=False)
    assert checkpoint["global_step"] == 3 and int(checkpoint["state_dict"]["model_ema.num_updates"]) == 3
    for key in first:
        torch.testing.assert_close(checkpoint["state_dict"][key], first[key], rtol=0, atol=0)
    assert len(list((tmp_path / "logs" / "ddp" / "configs").iterdir())) == 2
    assert [p.name for p in (tmp_path / "logs" / "ddp" / "images" / "train").iterdir()] == \
        ["gs-000001_e-0000_b-000000_0.png"], "rank 0 alone writes previews"
    assert not (tmp_path / "logs" / "child_runs").exists()

    resumed = subprocess.run([*torchrun, "--resume", "logs/ddp", "--max_steps", "5"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, f"resumed torchrun failed:\n{resumed.stdout[-3000:]}\n{resumed.stderr[-6000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", map_location="cpu", weights_only=False) for r in (0, 1)]
    assert [len(rank["cases"]) for rank in ranks] == [2, 2], "steps 4 and 5 only: the run continued from step 3"
    checkpoint = torch.load(tmp_path / "logs" / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu",
                            weights_only=False)
    assert checkpoint["global_step"] == 5 and int(checkpoint["state_dict"]["model_ema.num_updates"]) == 5
    for key in ranks[0]["state_dict"]:
        torch.testing.assert_close(ranks[0]["state_dict"][key], ranks[1]["state_dict"][key], rtol=0, atol=0)
        torch.testing.assert_close(checkpoint["state_dict"][key], ranks[0]["state_dict"][key], rtol=0, atol=0)
    plans = sorted((tmp_path / "logs" / "ddp" / "configs").glob("*-lightning.yaml"))
    assert OmegaConf.load(plans[-1]).lightning.trainer.max_steps == 5
