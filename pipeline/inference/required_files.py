"""Up-front check that every file a model config needs exists and can be read, before anything else runs.

``test.py`` and ``synthesize.py`` call :func:`check_required_files` before preprocessing or loading a model, so a
missing checkpoint is reported in seconds, not after an hour of preprocessing, and all missing files at once,
each with the config key that names it and where to get it.

What a model config needs (what the model classes read when they are built or first used):

- every ``ckpt_path`` (the model's, and a sub-model's such as the VQ of ``first_stage_config``);
- a text encoder's ``weights_path``, unless a checkpoint above it in the config holds its weights (LMNet.ckpt and
  LINet.ckpt hold ``cond_stage_model.*``; so inference and fine-tuning never read BiomedCLIP's weight file);
- a ``vocab_file`` when one is set (otherwise the BiomedCLIP tokenizer that ships with the project is used).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig

from ldm.errors import ConfigError, MissingWeightsError

RELEASE_SOURCE = "the original LesionDiffusion release (docs/weights.md)"
BIOMEDCLIP_SOURCE = "the Hugging Face repository microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
SOURCES = {
    "LMNet.ckpt": RELEASE_SOURCE,
    "LINet.ckpt": RELEASE_SOURCE,
    "VQ.ckpt": RELEASE_SOURCE,
    "open_clip_pytorch_model.bin": BIOMEDCLIP_SOURCE,
    "vocab.txt": BIOMEDCLIP_SOURCE + " (or leave vocab_file unset: the tokenizer ships with the project)",
}
OWN_RUN_SOURCE = ("your own training run (<logdir>/<name>/checkpoints/last.ckpt; docs/training.md) or "
                  + RELEASE_SOURCE)
# Where a sub-model built from ``<name>_config`` sits in its parent's state dict.
SUBMODEL_PREFIXES = {"first_stage_config": "first_stage_model.", "cond_stage_config": "cond_stage_model.",
                     "unet_config": "model."}


@dataclass(frozen=True)
class RequiredFile:
    """A file named by a config: its path, the key naming it (``model.params.ckpt_path``) and what it is."""

    path: Path
    key: str
    what: str

    @property
    def source(self) -> str:
        """Where to get the file, for the error message."""
        return SOURCES.get(self.path.name, OWN_RUN_SOURCE if self.what == "checkpoint" else "its configured origin")

    def problem(self) -> str | None:
        """Why the file cannot be used (``None`` when it can): absent, a folder, or unreadable."""
        if not self.path.exists():
            return "not found"
        if not self.path.is_file():
            return "is not a file"
        try:
            with self.path.open("rb") as handle:
                handle.read(1)
        except OSError as error:
            return f"not readable ({error.strerror or error})"
        return None


def _covered(prefix: str, ignore_keys: Iterable[str]) -> bool:
    """True unless ``ignore_keys`` leave out part of the sub-model at ``prefix`` (it would then read its own file)."""
    return not any(str(key).startswith(prefix) or prefix.startswith(str(key)) for key in ignore_keys)


def model_files(block: Any, key: str = "model", checkpoint_above: bool = False) -> list[RequiredFile]:
    """The files the ``target``/``params`` block at ``key`` (and its sub-model blocks) reads."""
    params = block.get("params") if isinstance(block, (dict, DictConfig)) else None
    if not isinstance(params, (dict, DictConfig)):
        return []
    files = []
    if params.get("ckpt_path"):
        files.append(RequiredFile(Path(str(params["ckpt_path"])), f"{key}.params.ckpt_path", "checkpoint"))
    if params.get("vocab_file"):
        files.append(RequiredFile(Path(str(params["vocab_file"])), f"{key}.params.vocab_file", "vocabulary"))
    if params.get("weights_path") and not checkpoint_above:
        files.append(RequiredFile(Path(str(params["weights_path"])), f"{key}.params.weights_path", "weights file"))
    has_checkpoint = bool(params.get("ckpt_path"))
    ignore_keys = list(params.get("ignore_keys") or [])
    for name, prefix in SUBMODEL_PREFIXES.items():
        covered = checkpoint_above or (has_checkpoint and _covered(prefix, ignore_keys))
        files += model_files(params.get(name), f"{key}.params.{name}", covered)
    return files


def missing_files(configs: Sequence[DictConfig]) -> list[tuple[RequiredFile, str]]:
    """Every file the ``model`` blocks of ``configs`` need that cannot be used, with the reason (no duplicates)."""
    found, seen = [], set()
    for config in configs:
        if not isinstance(config.get("model"), DictConfig):
            raise ConfigError("the config has no model block with a 'target'")
        for required in model_files(config.model):
            problem = required.problem()
            if problem and required.path not in seen:
                seen.add(required.path)
                found.append((required, problem))
    return found


def check_required_files(*configs: DictConfig) -> None:
    """MissingWeightsError naming every file the configs need that is absent or unreadable, and where to get it."""
    missing = missing_files(configs)
    if missing:
        details = "; ".join(f"{required.path}: {required.what} {problem} ({required.key}); get it from "
                            f"{required.source}" for required, problem in missing)
        raise MissingWeightsError(details if len(missing) == 1 else f"{len(missing)} files are missing: {details}")
