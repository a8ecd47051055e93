"""Train a LesionDiffusion stage (VQ-GAN, LMNet or LINet) from YAML configs with Lightning 2.

    python main.py --base configs/demo/lmnet.yaml -t --name demo_lmnet             # CPU, or one GPU if present
    python main.py --base configs/diffusion/maskdiffusion.yaml -t --name lmnet --gpus 0,1
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
        main.py --base configs/diffusion/maskdiffusion.yaml -t --name lmnet
    srun python main.py --base configs/diffusion/maskdiffusion.yaml -t --name lmnet     # in an sbatch script
    python main.py --resume logs/lmnet                                                # continue where it stopped

A run writes ``<logdir>/<name>/``: ``checkpoints/last.ckpt`` (the latest state: every ``--every_n_train_steps``
optimiser steps, at the end, on SIGUSR1/SIGTERM and on errors; see :mod:`ldm.callbacks.checkpointing`) and
``checkpoints/epoch=NNNNNN.ckpt`` (best 3 on the monitored value), ``configs/<time>-project.yaml`` and
``-lightning.yaml`` (the run's plan, see :mod:`ldm.runs`), ``images/train/*.png`` and ``tensorboard/``. Several
``--base`` configs merge left to right (found from the current directory or from ``pipeline/``), then
``key.sub=value`` overrides apply. Config paths resolve against ``pipeline/``, command-line paths against the
current directory. Under torchrun or SLURM the device and node counts come from the launcher.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import netrc
import os
import shlex
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytorch_lightning as pl  # noqa: E402
from lightning_fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from pytorch_lightning.plugins.environments import SLURMEnvironment  # noqa: E402
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn  # noqa: E402
from pytorch_lightning.utilities.exceptions import SIGTERMException  # noqa: E402

from ldm.callbacks import LastCheckpoint, SetupCallback  # noqa: E402
from ldm.cli import add_version, examples, parse_gpus, split_overrides  # noqa: E402
from ldm.distributed import detect_launch  # noqa: E402
from ldm.errors import ConfigError, DataError, LesionDiffusionError, MissingWeightsError  # noqa: E402
from ldm.models.checkpoint import checkpoint_trust, lightning_allow_list  # noqa: E402
from ldm.runs import (  # noqa: E402
    DEFAULT_EVERY_N_TRAIN_STEPS, RunPaths, every_n_train_steps, record_plan, resolve_run, run_seed,
)
from ldm.util import instantiate_from_config, load_config, seed_everything  # noqa: E402

TRAINER_FLAGS = ("accelerator", "num_nodes", "precision", "max_steps", "max_epochs", "strategy")
DEFAULT_CALLBACKS = {
    "image_logger": {"target": "ldm.callbacks.ImageLogger", "params": {"batch_frequency": 1000, "sample_steps": 10}},
    "learning_rate_logger": {"target": "pytorch_lightning.callbacks.LearningRateMonitor",
                             "params": {"logging_interval": "step"}},
    "resources": {"target": "ldm.callbacks.ResourceMonitor"},
}
CADENCE_HELP = f"lightning.modelcheckpoint.params.every_n_train_steps of the config, else {DEFAULT_EVERY_N_TRAIN_STEPS}"
DEMO_DATA = Path(__file__).resolve().parents[1] / "demo" / "data"
DEMO_DATA_HINT = "the demo's data is made by: python demo/make_phantoms.py --out demo/data (from the repository root)"
# Lightning warns when a run resumes mid-epoch with a loader that cannot replay the rest of that epoch. Our training
# datasets draw random crops, and a resumed run is seeded from --seed and the step (ldm.runs.run_seed): the rest of
# the epoch is a fresh draw by design, which the info line printed at resume says instead.
MID_EPOCH_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"
VQ_TRAINING_HINT = ("train one first: python main.py --base configs/autoencoder/lesiondiffusion_vq.yaml -t --name vq "
                    "(tiny CPU demo: --base configs/demo/vq.yaml), then set first_stage_config.params.ckpt_path to "
                    "<logdir>/vq/checkpoints/last.ckpt or copy that file to the configured path")


def str2bool(value: str | bool) -> bool:
    """``yes/true/t/y/1`` -> True, ``no/false/f/n/0`` -> False (argparse type)."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a LesionDiffusion stage. Extra key.sub=value arguments override the configs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples("python pipeline/main.py --base configs/demo/lmnet.yaml -t --name demo_lmnet --max_steps 200",
                        "python pipeline/main.py --resume logs/demo_lmnet --max_steps 400"))
    parser.add_argument("-b", "--base", nargs="*", default=[], metavar="CONFIG.yaml",
                        help="configs merged left to right (from the current directory, else from pipeline/)")
    parser.add_argument("-t", "--train", type=str2bool, nargs="?", const=True, default=True,
                        help="train (the default; '-t false' only validates)")
    parser.add_argument("-n", "--name", default="", help="run name: the folder under --logdir (default: config name)")
    parser.add_argument("-f", "--postfix", default="", help="appended to the run name")
    parser.add_argument("-r", "--resume", default="",
                        help="continue a run (its folder or one of its checkpoints) with its own configs and limits; "
                             "flags and overrides given now win")
    parser.add_argument("-s", "--seed", type=int, default=23,
                        help="seed for everything (default 23); a resumed run seeds from it and its checkpoint's step")
    parser.add_argument("-l", "--logdir", default="logs", help="folder holding the runs (default ./logs)")
    parser.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                        help="lr = accumulate x devices x nodes x batch size x base_learning_rate (default true)")
    parser.add_argument("--gpus", default=None, help="GPU ids, comma separated: '0,1' trains on GPUs 0 and 1")
    parser.add_argument("--devices", default=None, help="devices per node: a count, 'auto' or ids (Lightning)")
    parser.add_argument("--num_nodes", type=int, default=None, help="nodes (default: from torchrun, else 1)")
    parser.add_argument("--accelerator", default=None, help="cpu, gpu, mps or auto (default auto)")
    parser.add_argument("--strategy", default=None, help="Lightning strategy (default: ddp on several devices)")
    parser.add_argument("--precision", default=None, help="32-true (default), bf16-mixed, 16-mixed, ...")
    parser.add_argument("--max_steps", type=int, default=None, help="stop after this many optimiser steps")
    parser.add_argument("--max_epochs", type=int, default=None, help="stop after this many epochs")
    parser.add_argument("--every_n_train_steps", type=int, default=None, metavar="N",
                        help=f"write checkpoints/last.ckpt every N optimiser steps, 0 = only at the end (default: "
                             f"{CADENCE_HELP})")
    parser.add_argument("--logger", choices=("tensorboard", "wandb", "none"), default="tensorboard",
                        help="experiment logger (default tensorboard; wandb runs offline without credentials)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="read checkpoints with full unpickling (may run code from the file; trust_checkpoint)")
    parser.add_argument("-d", "--debug", action="store_true", help="show tracebacks of configuration errors")
    return add_version(parser)


def parse_devices(text: str) -> int | str:
    """``--devices`` as Lightning takes it: an int for a count (``-1`` = all), else the string (``auto``, ``0,1``)."""
    text = str(text).strip()
    return int(text) if text.lstrip("-").isdigit() else text


def under_slurm() -> bool:
    """True in a task that ``srun`` started (:func:`ldm.distributed.detect_launch`) and that Lightning manages (not
    an interactive allocation, not torchrun inside SLURM)."""
    return detect_launch().launcher == "slurm" and SLURMEnvironment.detect()


def launcher_layout() -> tuple[int, int, str] | None:
    """``(processes per node, nodes, what to match)`` when torchrun or SLURM's srun started this process, else None."""
    launch = detect_launch()
    if launch.launcher == "torchrun":
        return launch.processes_on_node, launch.nodes, "torchrun's --nproc_per_node"
    if under_slurm():
        return launch.processes_on_node, launch.nodes, "SLURM's --ntasks-per-node"
    return None


def trainer_settings(opt: argparse.Namespace, trainer_config: dict, manual_optimization: bool) -> dict:
    """Trainer keyword arguments: ``lightning.trainer`` of the config, then the command-line flags.

    Without a launcher one device is used unless asked otherwise; under torchrun or SLURM's srun the devices per
    node and the node count follow the launcher. Several devices mean DDP (with unused-parameter search for models
    that optimise disjoint parameter sets in turn, such as the VQ-GAN).
    """
    settings = dict(trainer_config)
    settings.update({key: getattr(opt, key) for key in TRAINER_FLAGS if getattr(opt, key) is not None})
    if opt.gpus is not None and opt.devices is not None:
        raise ConfigError("--gpus and --devices both given: use one of them")
    if opt.gpus is not None:
        settings.update(accelerator="gpu", devices=parse_gpus(opt.gpus))
    elif opt.devices is not None:
        settings["devices"] = parse_devices(opt.devices)
    layout = launcher_layout()
    if layout is not None:
        local, nodes, source = layout
        settings.setdefault("devices", local)
        settings.setdefault("num_nodes", nodes)
        devices = settings["devices"]
        count = len(devices) if isinstance(devices, (list, tuple)) else devices
        if isinstance(count, int) and count != local:
            raise ConfigError(f"{count} devices per node requested but {local} processes per node were started "
                              f"({source}); they must match")
    settings.setdefault("devices", 1)
    devices = settings["devices"]
    several = not (devices == 1 or (isinstance(devices, (list, tuple)) and len(devices) == 1)) \
        or int(settings.get("num_nodes", 1)) > 1
    if several and manual_optimization and "strategy" not in settings:
        settings["strategy"] = "ddp_find_unused_parameters_true"
    return settings


def check_first_stage(model_config: DictConfig) -> None:
    """Refuse a latent model (LINet) whose VQ checkpoint is missing or unreadable, saying how to train one."""
    params = model_config.get("params") or {}
    first_stage = params.get("first_stage_config")
    if not isinstance(first_stage, DictConfig):
        return
    checkpoint = (first_stage.get("params") or {}).get("ckpt_path")
    if checkpoint:
        if os.path.isfile(checkpoint) and os.access(checkpoint, os.R_OK):
            return
        problem = f"VQ checkpoint {checkpoint} not found or not readable"
    elif params.get("ckpt_path"):
        return  # a LINet checkpoint carries the VQ weights
    else:
        problem = "no VQ checkpoint configured"
    raise MissingWeightsError(f"model.params.first_stage_config.params.ckpt_path: {problem}; {VQ_TRAINING_HINT}")


def check_data(data: pl.LightningDataModule, train: bool) -> None:
    """Build the datasets the run needs now, before anything is written, so that a missing list fails at once;
    a missing demo list says how to make it."""
    try:
        data.setup("fit" if train else "validate")
    except DataError as error:
        if str(DEMO_DATA) in str(error):
            raise DataError(f"{error}; {DEMO_DATA_HINT}") from None
        raise


def launcher_command() -> list[str]:
    """The command that started this run, up to and including the script (``torchrun ... main.py`` under
    torchrun, read from the launcher's command line; ``python main.py`` otherwise)."""
    script = [sys.argv[0] if sys.argv and sys.argv[0].endswith("main.py") else "main.py"]
    if detect_launch().launcher == "torchrun":
        try:
            parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
            words = [word.decode() for word in parent if word]
        except (OSError, UnicodeDecodeError):
            words = []
        ours = Path(script[0]).resolve()
        for index, word in enumerate(words):
            if word.endswith(".py") and Path(word).resolve() == ours:
                return words[: index + 1]
        return ["torchrun", "...", *script]
    if under_slurm():
        return ["srun", "python", *script]
    return ["python", *script]


def is_reporting_process() -> bool:
    """True in the process that prints for its node: the only one, or local rank 0 under a launcher."""
    return os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) == "0"


def weights_from_resume(model_config: DictConfig) -> DictConfig:
    """A copy of the model block without initial checkpoints: a resumed run takes every weight from its own."""
    model_config = copy.deepcopy(model_config)
    params = model_config.get("params")
    if isinstance(params, DictConfig):
        if "ckpt_path" in params:
            params.ckpt_path = None
        first_stage = params.get("first_stage_config")
        if isinstance(first_stage, DictConfig) and isinstance(first_stage.get("params"), DictConfig):
            first_stage.params.ckpt_path = None
    return model_config


def wandb_credentials() -> bool:
    """True when a wandb API key is configured (``WANDB_API_KEY`` or a ``wandb login`` entry in ``~/.netrc``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def build_logger(kind: str, run_dir: Path):
    """The experiment logger, or False for none. wandb never prompts: without credentials it logs offline."""
    if kind == "none":
        return False
    if kind == "wandb":
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("--logger wandb needs the wandb package (pip install wandb)")
        from pytorch_lightning.loggers import WandbLogger
        return WandbLogger(name=run_dir.name, id=run_dir.name, save_dir=str(run_dir), offline=not wandb_credentials())
    from pytorch_lightning.loggers import TensorBoardLogger
    return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)


def build_callbacks(config: DictConfig, paths: RunPaths, monitor: str | None, with_logger: bool) -> list:
    """Run set-up, checkpointing and ``lightning.callbacks`` merged over the defaults (``null`` removes one).

    ``last.ckpt`` belongs to :class:`LastCheckpoint` (cadence: ``lightning.modelcheckpoint.params.
    every_n_train_steps``); Lightning's ``ModelCheckpoint`` keeps the best 3 on ``model.monitor`` after validation,
    with the other ``lightning.modelcheckpoint.params`` as its arguments."""
    lightning = config.get("lightning") or {}
    checkpoint_params = {"dirpath": str(paths.run_dir / "checkpoints"), "filename": "{epoch:06}"}
    if monitor:
        checkpoint_params.update(monitor=monitor, save_top_k=3)
    overrides = OmegaConf.to_container((lightning.get("modelcheckpoint") or {}).get("params") or OmegaConf.create())
    overrides.pop("every_n_train_steps", None)
    if overrides.pop("save_last", None) is False:
        rank_zero_warn("lightning.modelcheckpoint.params.save_last=false is ignored: last.ckpt always holds the "
                       "latest state (set the cadence with --every_n_train_steps; 0 = only at the end)")
    checkpoint_params.update(overrides)
    last = LastCheckpoint(paths.run_dir / "checkpoints" / "last.ckpt", every_n_train_steps(config),
                          requeue=under_slurm())
    callbacks = [SetupCallback(paths.run_dir, config, resumed=paths.resume_checkpoint is not None), last,
                 ModelCheckpoint(**checkpoint_params)]
    blocks = OmegaConf.merge(DEFAULT_CALLBACKS, lightning.get("callbacks") or {})
    for name, block in blocks.items():
        if block is None or (name == "learning_rate_logger" and not with_logger):
            continue
        callbacks.append(instantiate_from_config(block, key_path=f"lightning.callbacks.{name}"))
    return callbacks


def scale_learning_rate(model: pl.LightningModule, config: DictConfig, trainer: pl.Trainer, enabled: bool) -> None:
    """Set ``model.learning_rate`` from ``model.base_learning_rate`` (scaled by the effective batch when
    ``enabled``) and print how it was computed."""
    base = config.model.get("base_learning_rate")
    if base is None:
        rank_zero_info(f"model.base_learning_rate not set: keeping the model's learning rate {model.learning_rate:.2e}")
        return
    base = float(base)
    if not enabled:
        model.learning_rate = base
        rank_zero_info(f"Learning rate {base:.2e} (base_learning_rate; --scale_lr false)")
        return
    batch_size = int((config.get("data") or {}).get("params", {}).get("batch_size", 1))
    accumulate, devices, nodes = trainer.accumulate_grad_batches, trainer.num_devices, trainer.num_nodes
    model.learning_rate = accumulate * devices * nodes * batch_size * base
    rank_zero_info(f"Learning rate {model.learning_rate:.2e} = {accumulate} (accumulate_grad_batches) x {devices} "
                   f"(devices) x {nodes} (nodes) x {batch_size} (batch size) x {base:.2e} (base_learning_rate)")


@dataclass
class Run:
    """Everything ``fit`` needs, built by :func:`prepare`."""

    config: DictConfig
    paths: RunPaths
    model: pl.LightningModule
    data: pl.LightningDataModule
    trainer: pl.Trainer
    train: bool

    def execute(self) -> None:
        """Train (or, with ``-t false``, validate), resuming from the run's checkpoint when there is one."""
        checkpoint = str(self.paths.resume_checkpoint) if self.paths.resume_checkpoint else None
        trust = bool(self.config.get("trust_checkpoint", False))
        with checkpoint_trust(trust), lightning_allow_list(trust), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=MID_EPOCH_WARNING)
            if self.train:
                self.trainer.fit(self.model, datamodule=self.data, ckpt_path=checkpoint, weights_only=not trust)
            else:
                self.trainer.validate(self.model, datamodule=self.data, ckpt_path=checkpoint, weights_only=not trust)


def prepare(opt: argparse.Namespace, overrides: list[str]) -> Run:
    """Configs, model, data and Trainer for the parsed command line (nothing is written yet)."""
    paths = resolve_run(opt)
    config = load_config(paths.configs, overrides + ["trust_checkpoint=true"] * opt.trust_checkpoint)
    for key in ("model", "data"):
        if not isinstance(config.get(key), DictConfig):
            raise ConfigError(f"{paths.configs[-1]}: the merged config has no '{key}' block")
    record_plan(config, opt)
    lightning = config.setdefault("lightning", OmegaConf.create())
    trainer_config = OmegaConf.to_container(lightning.get("trainer") or OmegaConf.create(), resolve=True)
    seed = seed_everything(run_seed(opt.seed, paths.resume_checkpoint, bool(config.get("trust_checkpoint", False))))
    if paths.resume_checkpoint is not None:
        rank_zero_info(f"Resumed run: seed {seed}, from --seed {opt.seed} and the checkpoint's global step; a run "
                       "stopped mid-epoch draws new random crops for the rest of that epoch (not a replay)")
    if paths.resume_checkpoint is None:
        check_first_stage(config.model)
    model_config = weights_from_resume(config.model) if paths.resume_checkpoint else config.model
    with checkpoint_trust(bool(config.get("trust_checkpoint", False))):
        model = instantiate_from_config(model_config, key_path="model")
    data = instantiate_from_config(config.data, key_path="data")
    check_data(data, opt.train)
    logger = build_logger(opt.logger, paths.run_dir)
    settings = trainer_settings(opt, trainer_config, manual_optimization=not model.automatic_optimization)
    if under_slurm() and "plugins" not in settings:
        # SLURM sets ranks and nodes; LastCheckpoint saves at a batch boundary and requeues on SIGUSR1 instead of
        # Lightning's handler, which would save from inside the signal handler, possibly mid optimiser step.
        settings["plugins"] = [SLURMEnvironment(auto_requeue=False)]
    callbacks = build_callbacks(config, paths, getattr(model, "monitor", None), with_logger=logger is not False)
    try:
        trainer = pl.Trainer(default_root_dir=str(paths.run_dir), logger=logger, callbacks=callbacks, **settings)
    except (MisconfigurationException, ValueError, TypeError) as error:
        raise ConfigError(f"lightning.trainer / trainer flags {settings}: {error}") from None
    scale_learning_rate(model, config, trainer, opt.scale_lr)
    return Run(config, paths, model, data, trainer, opt.train)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (1 with a one-line message for a LesionDiffusionError, 143 after
    SIGTERM once ``last.ckpt`` is saved)."""
    parser = build_parser()
    arguments, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    opt = parser.parse_args(arguments)
    try:
        run = prepare(opt, overrides)
        run.execute()
    except LesionDiffusionError as error:
        if opt.debug:
            raise
        # Every process of a launch meets the same input: one line per node (its local rank 0) is enough.
        if is_reporting_process():
            rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))
            prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
            print(f"{prefix}main.py: error: {error}", file=sys.stderr)
        return 1
    except SIGTERMException:
        if is_reporting_process():
            command = shlex.join([*launcher_command(), "--resume", str(run.paths.run_dir)])
            print(f"main.py: stopped by SIGTERM; last.ckpt is saved; continue with: {command}", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
