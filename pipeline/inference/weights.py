"""The weight files of a test config: opened and matched with the model before any case runs, and recorded in
every report.

Each checkpoint the model block names (``model.params.ckpt_path``, a LINet's
``model.params.first_stage_config.params.ckpt_path``) is read (safely, see :mod:`ldm.models.checkpoint`) and its
keys and shapes are compared with the model the config builds on the meta device (nothing allocated), so a
damaged, truncated or wrong file fails before any sampling, naming the stage and the config. :func:`weight_records`
gives each file's path, size and sha256, so that a result can be traced to the weights it came from.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from omegaconf import DictConfig

from ldm.errors import LesionDiffusionError, MissingWeightsError
from ldm.models.checkpoint import checkpoint_trust, fit_state, model_key_shapes, read_state_dict

FIRST_STAGE = "first_stage_model."
HASH_CHUNK = 1 << 24


def weight_files(config: DictConfig) -> dict[str, str]:
    """``{config key: checkpoint path}`` of every checkpoint the model block of ``config`` names."""
    params = config.model.get("params") or {}
    found = {"model.params.ckpt_path": params.get("ckpt_path")}
    first_stage = params.get("first_stage_config")
    if isinstance(first_stage, DictConfig):
        found["model.params.first_stage_config.params.ckpt_path"] = (first_stage.get("params") or {}).get("ckpt_path")
    return {key: str(path) for key, path in found.items() if path}


def verify_weights(config: DictConfig, stage: str, config_name: str = "") -> None:
    """Open every checkpoint of ``config`` and match its keys with the model; MissingWeightsError (DataError for an
    unreadable file) naming the stage, the config key and ``config_name`` when one does not fit."""
    where = f" of {config_name}" if config_name else ""
    files = weight_files(config)
    own = model_key_shapes(config.model)
    params = config.model.get("params") or {}
    for key, path in files.items():
        label = f"{stage} checkpoint {path} ({key}{where})"
        try:
            with checkpoint_trust(bool(config.get("trust_checkpoint", False))):
                state = read_state_dict(path)
            if key == "model.params.ckpt_path":
                fit_state(state, own, params.get("ignore_keys") or (), source=label)
            else:
                first = {name[len(FIRST_STAGE):]: shape for name, shape in own.items() if name.startswith(FIRST_STAGE)}
                ignore = (params.first_stage_config.get("params") or {}).get("ignore_keys") or ()
                fit_state(state, first, ignore, source=label)
        except LesionDiffusionError as error:
            message = str(error)
            if not message.startswith(label):
                message = f"{label}: {message.removeprefix(path + ': ')}"
            raise type(error)(message) from None


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: str | Path) -> dict:
    """``{"path", "bytes", "sha256"}`` of a weight file (the hash is computed once per file version)."""
    path = Path(path).resolve()
    stat = path.stat()
    return {"path": str(path), "bytes": stat.st_size, "sha256": _sha256(str(path), stat.st_size, stat.st_mtime_ns)}


def weight_records(config: DictConfig) -> dict[str, dict]:
    """``{config key: file_record}`` of every checkpoint of ``config`` (files that are gone are left out)."""
    try:
        return {key: file_record(path) for key, path in weight_files(config).items() if Path(path).is_file()}
    except OSError as error:
        raise MissingWeightsError(f"cannot read a checkpoint to record it ({error})") from None
