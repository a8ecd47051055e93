"""Training never loses work: step checkpoints, ``last.ckpt`` = the final state, a real ``kill -9`` of a training
process followed by ``--resume RUN_DIR`` alone (it ends at the run's own ``--max_steps`` with the weights of the
kill point), SIGTERM and SLURM's SIGUSR1 + requeue, and atomic checkpoint writes under a real kill."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.plugins.environments import SLURMEnvironment

import main
from ldm.callbacks.checkpointing import remove_partial_writes
from ldm.cli import split_overrides
from ldm.distributed import TORCHRUN_VARIABLES
from ldm.errors import ConfigError, DataError
from ldm.fileio import atomic_path
from ldm.runs import resolve_run, resumed_seed, run_seed
from ldm.util import seed_everything

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "pipeline" / "main.py"
KINDS = ("image", "label", "type", "seg", "coarseg")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


class RecordLast(pl.Callback):
    """Notes the global step held by ``last.ckpt`` whenever the file changed, at the start of every batch and at the
    end of training (it runs after ``LastCheckpoint``, so a save of this boundary is already on disk)."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.steps: list[int] = []
        self._seen = None

    def _look(self) -> None:
        if self.path.is_file() and self.path.stat().st_mtime_ns != self._seen:
            self._seen = self.path.stat().st_mtime_ns
            self.steps.append(int(load(self.path)["global_step"]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._look()

    def on_train_end(self, trainer, pl_module):
        self._look()


class SignalAt(pl.Callback):
    """Sends ``signum`` to this process at the end of training batch ``batch``."""

    def __init__(self, batch: int, signum: int):
        self.batch, self.signum = batch, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.fit_loop.total_batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


class Pace(pl.Callback):
    """Sleeps ``seconds`` after every training batch, so that a test can kill the process mid-run."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


class StateAtStart(pl.Callback):
    """Saves the restored state (weights, EMA, optimiser) to ``<directory>/start-<global step>.pt`` as training
    starts, after Lightning restored the checkpoint of a resumed run."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_train_start(self, trainer, pl_module):
        state = {key: value.detach().clone() for key, value in pl_module.state_dict().items()
                 if isinstance(value, torch.Tensor)}
        torch.save({"state_dict": state, "optimizer": trainer.optimizers[0].state_dict()},
                   self.directory / f"start-{trainer.global_step}.pt")


def lmnet_argv(phantoms: Path, logdir: Path, *extra: str) -> list[str]:
    """The demo LMNet on the test phantoms, 8 x 16 x 16 crops, 3 batches per epoch, no previews or logger;
    ``--base`` is given relative to ``pipeline/`` (found from any directory)."""
    argv = ["--base", "configs/demo/lmnet.yaml", "-l", str(logdir), "-n", "run", "--logger", "none",
            "lightning.callbacks.image_logger=null", "lightning.trainer.num_sanity_val_steps=0",
            "lightning.trainer.enable_progress_bar=false", "data.params.train.params.iter_num=3"]
    for split, prefix in (("train", "train"), ("validation", "val")):
        argv += [f"data.params.{split}.params.{kind}_list={phantoms}/{prefix}_{kind}_list.txt" for kind in KINDS]
        argv.append(f"data.params.{split}.params.crop_shape=[8,16,16]")
    return argv + list(extra)


def prepared(argv: list[str]) -> main.Run:
    arguments, overrides = split_overrides(argv)
    return main.prepare(main.build_parser().parse_args(arguments), overrides)


def recorder(run: main.Run) -> RecordLast:
    return next(callback for callback in run.trainer.callbacks if isinstance(callback, RecordLast))


def test_step_checkpoints_and_last_ckpt_holds_the_final_step(phantoms, tmp_path):
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    run = prepared(lmnet_argv(phantoms, tmp_path, "--max_steps", "5", "--every_n_train_steps", "2",
                              "lightning.callbacks.record.target=test_train_resume.RecordLast",
                              f"lightning.callbacks.record.params.path={last}"))
    run.execute()
    assert recorder(run).steps == [2, 4, 5], "every 2 steps, independent of validation, then the end of fit"
    checkpoint = load(last)
    assert checkpoint["global_step"] == 5 and int(checkpoint["state_dict"]["model_ema.num_updates"]) == 5
    assert checkpoint["optimizer_states"][0]["state"][0]["step"] == 5
    assert (tmp_path / "run" / "checkpoints" / "epoch=000000.ckpt").is_file(), "top-k after validation stays"
    assert not list(last.parent.glob(".*")), "no temporary files left"
    saved = OmegaConf.merge(*(OmegaConf.load(p) for p in sorted((tmp_path / "run" / "configs").glob("*.yaml"))))
    assert saved.lightning.trainer.max_steps == 5
    assert saved.lightning.modelcheckpoint.params.every_n_train_steps == 2


def test_sigterm_saves_the_completed_batch_and_exits_143(phantoms, tmp_path, capsys):
    argv = lmnet_argv(phantoms, tmp_path, "--max_steps", "6", "--every_n_train_steps", "0",
                      "lightning.callbacks.signal.target=test_train_resume.SignalAt",
                      "lightning.callbacks.signal.params.batch=1", f"lightning.callbacks.signal.params.signum={int(signal.SIGTERM)}")
    assert main.main(argv) == 128 + signal.SIGTERM
    assert f"--resume {tmp_path / 'run'}" in capsys.readouterr().err
    checkpoint = load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    # SIGTERM during batch 1: Lightning ends that batch (EMA update included), then stops; the save follows.
    assert checkpoint["global_step"] == 2 and int(checkpoint["state_dict"]["model_ema.num_updates"]) == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_slurm_sigusr1_saves_after_the_batch_and_requeues(phantoms, tmp_path, monkeypatch):
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')  # SLURM's tool is absent here
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "lmnet", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost", "SLURM_NTASKS_PER_NODE": "1"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    run = prepared(lmnet_argv(phantoms, tmp_path, "--max_steps", "4", "--every_n_train_steps", "0",
                              "lightning.callbacks.signal.target=test_train_resume.SignalAt",
                              "lightning.callbacks.signal.params.batch=1",
                              f"lightning.callbacks.signal.params.signum={int(signal.SIGUSR1)}",
                              "lightning.callbacks.record.target=test_train_resume.RecordLast",
                              f"lightning.callbacks.record.params.path={last}"))
    environment = run.trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and not environment.auto_requeue
    run.execute()
    # SIGUSR1 at the end of batch 1 -> saved before batch 2 (2 complete steps), job requeued, training goes on.
    assert recorder(run).steps == [2, 4]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_a_kill_while_writing_leaves_the_previous_checkpoint(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    torch.save({"global_step": 7}, last)
    writer = ("import sys, time\nsys.path.insert(0, sys.argv[2])\nfrom ldm.fileio import atomic_path\n"
              "with atomic_path(sys.argv[1]) as temporary, open(temporary, 'wb') as handle:\n"
              "    while True:\n        handle.write(b'x' * 65536); handle.flush(); time.sleep(0.01)\n")
    process = subprocess.Popen([sys.executable, "-c", writer, str(last), str(ROOT / "pipeline")])
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size > 0 for p in last.parent.glob(".*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = list(last.parent.glob(".*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0, "killed mid-write"
    assert load(last) == {"global_step": 7}
    assert remove_partial_writes(last.parent) == partial and sorted(last.parent.iterdir()) == [last]
    with atomic_path(last) as temporary:
        torch.save({"global_step": 8}, temporary)
    assert load(last) == {"global_step": 8}


def test_kill_9_then_resume_run_dir_alone_finishes_the_plan(phantoms, tmp_path):
    run_dir = tmp_path / "logs" / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    first = [sys.executable, str(MAIN), *lmnet_argv(phantoms, tmp_path / "logs", "--max_steps", "6",
                                                    "--every_n_train_steps", "2",
                                                    "lightning.callbacks.pace.target=test_train_resume.Pace",
                                                    "lightning.callbacks.pace.params.seconds=0.4",
                                                    "lightning.callbacks.start.target=test_train_resume.StateAtStart",
                                                    f"lightning.callbacks.start.params.directory={tmp_path}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = (tmp_path / "first.log").open("w")
    process = subprocess.Popen(first, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    at_kill = load(last)
    assert 2 <= at_kill["global_step"] < 6 and at_kill["global_step"] % 2 == 0

    result = subprocess.run([sys.executable, str(MAIN), "--resume", str(run_dir)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    final = load(last)
    assert final["global_step"] == 6, "the run's own --max_steps"
    assert int(final["state_dict"]["model_ema.num_updates"]) == 6
    start = torch.load(tmp_path / f"start-{at_kill['global_step']}.pt", map_location="cpu", weights_only=False)
    tensors = {key: value for key, value in at_kill["state_dict"].items() if isinstance(value, torch.Tensor)}
    assert start["state_dict"].keys() == tensors.keys()
    for key, value in tensors.items():
        torch.testing.assert_close(start["state_dict"][key], value, rtol=0, atol=0, msg=key)
    restored, saved = start["optimizer"]["state"], at_kill["optimizer_states"][0]["state"]
    assert restored.keys() == saved.keys() and int(restored[0]["step"]) == at_kill["global_step"]
    for index in saved:
        torch.testing.assert_close(restored[index]["exp_avg"], saved[index]["exp_avg"], rtol=0, atol=0)
    configs = sorted((run_dir / "configs").glob("*-lightning.yaml"))
    assert [OmegaConf.load(p).lightning.trainer.max_steps for p in configs] == [6] * len(configs)


def test_resume_of_a_folder_without_checkpoint_names_the_first_save(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    (run / "checkpoints" / ".last.tmp1-2.ckpt").write_bytes(b"partial")
    (run / "configs" / "20260101T000000-lightning.yaml").write_text(
        "lightning:\n  modelcheckpoint:\n    params:\n      every_n_train_steps: 50\n")
    (run / "configs" / "20260101T000000-project.yaml").write_text("model: {}\n")
    opt = main.build_parser().parse_args(["--resume", str(run)])
    with pytest.raises(ConfigError, match=r"first scheduled save at step 50 .*every_n_train_steps=50") as error:
        resolve_run(opt)
    assert "-t --name run" in str(error.value) and "\n" not in str(error.value)
    (run / "checkpoints" / "epoch=000003.ckpt").write_bytes(b"x")
    (run / "checkpoints" / "epoch=000001.ckpt").write_bytes(b"x")
    assert resolve_run(opt).resume_checkpoint.name == "epoch=000001.ckpt", "no last.ckpt: the newest checkpoint"


def test_the_cadence_counts_crossed_multiples():
    from ldm.callbacks import LastCheckpoint

    callback = LastCheckpoint("unused.ckpt", every_n_train_steps=25)
    saved = []
    for step in range(0, 80, 2):  # two optimiser steps per batch
        if callback.is_due(step):
            saved.append(step)
            callback.saved_step = step
    assert saved == [26, 50, 76]
    callback.saved_step = 7  # resumed at step 7
    assert not callback.is_due(7) and not callback.is_due(24) and callback.is_due(25)
    assert not any(LastCheckpoint("unused.ckpt", 0).is_due(step) for step in range(100))
    with pytest.raises(ConfigError, match="every_n_train_steps must be >= 0"):
        LastCheckpoint("unused.ckpt", -1)


def test_the_documented_sbatch_script_starts_then_resumes(tmp_path):
    text = (ROOT / "docs" / "training.md").read_text()
    section = text[text.index("**Several nodes with SLURM**"):]
    script = section[section.index("```bash\n") + 8:section.index("```\n", section.index("```bash\n") + 8)]
    assert "#SBATCH --signal=USR1@" in script and "#SBATCH --requeue" in script
    bin_dir, calls = tmp_path / "bin", tmp_path / "srun_calls.txt"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')  # SLURM is absent here
    (bin_dir / "srun").chmod(0o755)
    (tmp_path / "pipeline").mkdir()
    env = {**os.environ, "SLURM_SUBMIT_DIR": str(tmp_path), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for _ in ("first", "requeued"):
        subprocess.run(["bash", "-c", script], env=env, check=True)
        (tmp_path / "pipeline" / "logs" / "lmnet" / "checkpoints").mkdir(parents=True, exist_ok=True)
        (tmp_path / "pipeline" / "logs" / "lmnet" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    first, requeued = calls.read_text().splitlines()
    assert first.startswith("python main.py --base configs/diffusion/maskdiffusion.yaml -t --name lmnet")
    assert requeued == "python main.py --resume logs/lmnet"


def test_a_resumed_run_draws_fresh_but_reproducible_randomness(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for step in (4, 6):
        torch.save({"global_step": step, "state_dict": {"w": torch.zeros(2)}}, checkpoints / f"step{step}.ckpt")
    assert run_seed(23, None) == 23
    at_4 = run_seed(23, checkpoints / "step4.ckpt")
    assert at_4 == resumed_seed(23, 4) == run_seed(23, checkpoints / "step4.ckpt")
    assert len({23, at_4, run_seed(23, checkpoints / "step6.ckpt"), resumed_seed(24, 4)}) == 4
    assert all(0 <= resumed_seed(seed, step) < 2**32 for seed in (-1, 0, 2**40) for step in (0, 10**9))

    def draws(seed: int) -> tuple[int, list[float]]:
        seed_everything(seed)
        return torch.initial_seed(), torch.rand(4).tolist()

    assert draws(at_4) == draws(at_4)
    assert draws(at_4)[0] != draws(23)[0] and draws(at_4)[1] != draws(23)[1]
    torch.save({"state_dict": {"w": torch.zeros(2)}}, checkpoints / "bare.ckpt")
    with pytest.raises(DataError, match="bare.ckpt: the checkpoint records no global_step"):
        run_seed(23, checkpoints / "bare.ckpt")
