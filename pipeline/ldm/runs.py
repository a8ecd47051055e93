"""Run folders of ``main.py``: where a run lives, what a resumed run starts from, and the plan it keeps.

A run folder ``<logdir>/<name>/`` holds ``checkpoints/`` and ``configs/<time>-{project,lightning}.yaml``. The
saved configs are the whole plan of the run: the merged YAML with every override, the trainer flags that were
given (``--max_steps``, ``--max_epochs``, ``--precision``, ...) under ``lightning.trainer`` and the checkpoint
cadence under ``lightning.modelcheckpoint.params.every_n_train_steps``. ``--resume`` merges them in the order
they were written, then the flags and overrides given now (which win and are saved again).

A resumed run seeds everything from ``(--seed, global step of its checkpoint)`` (:func:`run_seed`): it continues
with random crops the run has not drawn yet, and resuming the same checkpoint twice draws the same ones.

The hardware layout (``--gpus``, ``--devices``, ``--num_nodes``) is not part of the plan: a requeued or resumed
job may run on other machines, and under torchrun or SLURM the layout comes from the launcher.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ldm.cli import find_config
from ldm.errors import ConfigError, DataError
from ldm.models.checkpoint import read_checkpoint

PLAN_FLAGS = ("max_steps", "max_epochs", "precision", "strategy", "accelerator")
CADENCE_KEY = "lightning.modelcheckpoint.params.every_n_train_steps"
DEFAULT_EVERY_N_TRAIN_STEPS = 1000
LAST = "last.ckpt"


@dataclass
class RunPaths:
    """Where a run lives and what it starts from."""

    run_dir: Path
    resume_checkpoint: Path | None
    configs: list[Path]


def checkpoints_in(run_dir: Path) -> list[Path]:
    """The finished checkpoints of a run, oldest first (hidden temporary files of a write in progress excluded)."""
    found = [path for path in (run_dir / "checkpoints").glob("*.ckpt") if not path.name.startswith(".")]
    return sorted(found, key=lambda path: path.stat().st_mtime)


def saved_configs(run_dir: Path) -> list[Path]:
    """The configs a run saved, in the order they were written (the time stamp leads each name)."""
    return sorted((run_dir / "configs").glob("*.yaml"))


def every_n_train_steps(config: DictConfig) -> int:
    """The ``last.ckpt`` cadence of a merged config (``DEFAULT_EVERY_N_TRAIN_STEPS`` when it sets none)."""
    value = OmegaConf.select(config, CADENCE_KEY, default=None)
    return DEFAULT_EVERY_N_TRAIN_STEPS if value is None else int(value)


def no_checkpoint_message(run_dir: Path, given: str) -> str:
    """Why ``--resume`` cannot continue a run folder that holds no checkpoint, and what to do instead."""
    configs = saved_configs(run_dir)
    if not configs:
        return f"--resume {given}: {run_dir} holds no checkpoint and no saved configs; start the run with --base"
    plan = OmegaConf.merge(*(OmegaConf.load(path) for path in configs))
    cadence = every_n_train_steps(plan)
    when = f"at step {cadence} ({CADENCE_KEY}={cadence})" if cadence > 0 else \
        f"at the end of training ({CADENCE_KEY}=0)"
    return (f"--resume {given}: no checkpoint in {run_dir / 'checkpoints'} yet; the run stopped before its first "
            f"scheduled save {when}. Start it again: python main.py --base {' '.join(str(p) for p in configs)} "
            f"-t --name {run_dir.name} --logdir {run_dir.parent}")


def resume_target(given: str) -> tuple[Path, Path]:
    """``(run folder, checkpoint)`` for ``--resume`` of a run folder or of one of its checkpoints: a folder
    continues from ``last.ckpt``, else from its newest checkpoint."""
    target = Path(given).expanduser().resolve()
    if target.is_file():
        if target.parent.name != "checkpoints":
            raise ConfigError(f"--resume {given}: a checkpoint must sit in <run>/checkpoints/")
        return target.parent.parent, target
    if not target.is_dir():
        raise ConfigError(f"--resume {given}: no such run folder or checkpoint")
    last = target / "checkpoints" / LAST
    if last.is_file():
        return target, last
    found = checkpoints_in(target)
    if not found:
        raise ConfigError(no_checkpoint_message(target, given))
    return target, found[-1]


def resolve_run(opt: argparse.Namespace) -> RunPaths:
    """The run folder, the checkpoint to resume from (or None) and the configs to merge (a resumed run's saved
    configs first). ``--base`` paths are found from the current directory or from ``pipeline/``. Refuses to
    train a new run into a folder that already holds checkpoints."""
    extra = [Path(find_config(path)) for path in opt.base]
    if opt.resume:
        if opt.name:
            raise ConfigError("-n/--name and -r/--resume cannot be combined: a resumed run keeps its folder")
        run_dir, checkpoint = resume_target(opt.resume)
        return RunPaths(run_dir, checkpoint, saved_configs(run_dir) + extra)
    if not opt.base:
        raise ConfigError("no config given: pass --base <config.yaml> (or --resume <run folder>)")
    name = (opt.name or Path(opt.base[0]).stem) + opt.postfix
    if not name or os.sep in name or name in (".", ".."):
        raise ConfigError(f"--name {name!r}: a run name must be a plain folder name")
    run_dir = Path(opt.logdir).expanduser().resolve() / name
    existing = checkpoints_in(run_dir)
    if existing:
        raise ConfigError(f"{run_dir} already holds a run ({existing[-1].name}): continue it with --resume {run_dir} "
                          "or choose another --name")
    return RunPaths(run_dir, None, extra)


def record_plan(config: DictConfig, opt: argparse.Namespace) -> None:
    """Write the flags given on this command line into ``config`` so that the saved configs carry them: the
    ``PLAN_FLAGS`` under ``lightning.trainer``, ``--every_n_train_steps`` under ``lightning.modelcheckpoint``."""
    for flag in PLAN_FLAGS:
        value = getattr(opt, flag, None)
        if value is not None:
            OmegaConf.update(config, f"lightning.trainer.{flag}", value, force_add=True)
    if getattr(opt, "every_n_train_steps", None) is not None:
        OmegaConf.update(config, CADENCE_KEY, opt.every_n_train_steps, force_add=True)


def resumed_seed(seed: int, global_step: int) -> int:
    """The seed of a run resumed at ``global_step`` (optimiser steps done) of a run started with ``seed``: a
    32-bit hash of both, so every resume point draws a fresh stream that is still a function of the two."""
    state = np.random.SeedSequence([int(seed) % 2**64, int(global_step)]).generate_state(1, dtype=np.uint32)
    return int(state[0])


def checkpoint_global_step(path: Path, trust: bool | None = None) -> int:
    """The ``global_step`` a Lightning checkpoint was saved at (its tensors are memory-mapped, not read)."""
    step = read_checkpoint(path, trust).get("global_step")
    if not isinstance(step, int) or step < 0:
        raise DataError(f"{path}: the checkpoint records no global_step; resume needs a checkpoint saved by main.py")
    return step


def run_seed(seed: int, resume_checkpoint: Path | None, trust: bool | None = None) -> int:
    """The seed of this run: ``seed`` for a new run, :func:`resumed_seed` of the checkpoint's step when resuming."""
    if resume_checkpoint is None:
        return int(seed)
    return resumed_seed(seed, checkpoint_global_step(resume_checkpoint, trust))
