"""main.py as a new user meets it: a missing demo list fails before anything is written, in one line per node
(torchrun included) saying how to make it; SIGTERM under torchrun names the launcher in the resume hint; a resumed
run times its first epoch from the resume, explains instead of warning, and draws crops seeded from (seed, step)."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from test_train_resume import lmnet_argv

import main
from ldm.runs import resumed_seed

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "pipeline" / "main.py"
ABSENT_DEMO = ROOT / "demo" / "data" / "never-made-by-the-tests"


class Crops(pl.Callback):
    """Appends ``{step, seed, crop}`` (the torch seed and a hash of the batch's cases and lesion crops) to a
    JSON-lines file."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        crop = hashlib.sha256(json.dumps([batch["image_path"], batch["crop"]], sort_keys=True, default=str).encode())
        crop = crop.hexdigest()
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": trainer.global_step, "seed": torch.initial_seed(), "crop": crop}) + "\n")


class TerminateLauncher(pl.Callback):
    """On rank 0, sends SIGTERM to the launcher (this process's parent) at the end of training batch ``batch``, as a
    scheduler stopping the job would."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 0 and trainer.fit_loop.total_batch_idx == self.batch:
            os.kill(os.getppid(), signal.SIGTERM)


def demo_argv(logdir: Path, *extra: str) -> list[str]:
    lists = [f"data.params.{split}.params.{kind}_list={ABSENT_DEMO}/{prefix}_{kind}_list.txt"
             for split, prefix in (("train", "train"), ("validation", "val"))
             for kind in ("image", "label", "type", "seg", "coarseg")]
    return ["--base", "configs/demo/lmnet.yaml", "-t", "--name", "demo", "-l", str(logdir), "--logger", "none",
            *lists, *extra]


def test_a_missing_demo_list_is_one_line_with_the_hint_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    assert main.main(demo_argv(tmp_path / "logs")) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"main.py: error: {ABSENT_DEMO}/train_image_list.txt: list file "
                                                   "not found; the demo's data is made by: python "
                                                   "demo/make_phantoms.py --out demo/data")
    assert not (tmp_path / "logs").exists(), "no empty run folder is left behind"
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    assert main.main(demo_argv(tmp_path / "logs")) == 1
    assert capsys.readouterr().err == "", "the other processes of a node stay silent"


def torchrun_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_under_torchrun_a_user_error_is_one_line_and_sigterm_names_the_launcher(phantoms, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(MAIN)]
    result = subprocess.run([*torchrun, *demo_argv(tmp_path / "logs")], cwd=tmp_path, env=torchrun_env(),
                            capture_output=True, text=True, timeout=600)
    ours = [line for line in result.stderr.splitlines() if "main.py: error:" in line]
    assert len(ours) == 1 and "demo/make_phantoms.py" in ours[0], result.stderr[-3000:]
    assert result.returncode != 0 and not (tmp_path / "logs").exists()

    argv = lmnet_argv(phantoms, tmp_path / "run_logs", "--max_steps", "20", "--every_n_train_steps", "0",
                      "lightning.callbacks.stop.target=test_train_launch.TerminateLauncher",
                      "lightning.callbacks.stop.params.batch=1")
    result = subprocess.run([*torchrun, *argv], cwd=tmp_path, env=torchrun_env(), capture_output=True, text=True,
                            timeout=600)
    run_dir = tmp_path / "run_logs" / "run"
    hints = [line for line in result.stderr.splitlines() if "stopped by SIGTERM" in line]
    assert len(hints) == 1, result.stderr[-4000:]
    assert hints[0].endswith(f"continue with: {sys.executable} -m torch.distributed.run --standalone "
                             f"--nproc_per_node 2 {MAIN} --resume {run_dir}"), hints[0]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] >= 2


def test_resume_times_from_the_resume_explains_mid_epoch_and_draws_new_crops(phantoms, tmp_path, capsys, caplog):
    crops = tmp_path / "crops.jsonl"
    argv = lmnet_argv(phantoms, tmp_path, "--max_steps", "6", "--every_n_train_steps", "0",
                      "data.params.train.params.iter_num=6",
                      "lightning.callbacks.signal.target=test_train_resume.SignalAt",
                      "lightning.callbacks.signal.params.batch=2",
                      f"lightning.callbacks.signal.params.signum={int(signal.SIGTERM)}",
                      "lightning.callbacks.crops.target=test_train_launch.Crops",
                      f"lightning.callbacks.crops.params.path={crops}")
    assert main.main(argv) == 128 + signal.SIGTERM
    capsys.readouterr()
    caplog.clear()
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main.main(["--resume", str(tmp_path / "run"), "lightning.callbacks.signal=null"]) == 0
    wall = time.monotonic() - start
    assert not [w for w in caught if "not resumable" in str(w.message)]
    logged = caplog.text + capsys.readouterr().err
    assert "draws new random crops for the rest of that epoch" in logged
    (epoch,) = re.findall(r"Epoch 0: ([\d.]+) s, (\d+) batches", logged)
    assert float(epoch[0]) <= wall and epoch[1] == "3", "epoch 0 resumed at batch 3 of 6: timed from the resume"
    records = [json.loads(line) for line in crops.read_text().splitlines()]
    first, resumed = records[:3], records[3:]
    assert [record["step"] for record in records] == [0, 1, 2, 3, 4, 5]
    assert {record["seed"] for record in first} == {23}
    assert {record["seed"] for record in resumed} == {resumed_seed(23, 3)}
    # Seeded with --seed alone, the resumed process would draw the first run's crops again, in the same order.
    assert [record["crop"] for record in resumed] != [record["crop"] for record in first]
