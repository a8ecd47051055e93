"""Reading checkpoints safely, and loading them strictly into our modules.

A ``.ckpt`` (``.pt``, ``.bin``) file is a pickle, and unpickling can run any code. Every checkpoint of the project
is read by :func:`read_checkpoint`: ``torch.load(weights_only=True)`` with an allow-list of the plain-data types
Lightning checkpoints hold (:func:`allowed_globals`: OmegaConf containers and their nodes, Lightning's
``AttributeDict``, numpy scalars, arrays and dtypes, ``pathlib`` paths, ``collections`` containers). A file that
needs anything else is refused with :class:`UntrustedCheckpointError` naming the types, unless the user trusts it
explicitly (``--trust-checkpoint`` or ``trust_checkpoint: true``, see :func:`checkpoint_trust`). ``.safetensors``
files hold tensors only and are accepted wherever a ``.ckpt`` is (``pipeline/convert_checkpoint.py`` writes them).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import pathlib
import pickle
import re
import typing
import warnings
import zipfile
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from ldm.errors import DataError, MissingWeightsError

SAFETENSORS_SUFFIX = ".safetensors"
# Keys that the original *test-time* modules carry (an LPIPS metric) and no training checkpoint needs.
TEST_ONLY_PREFIXES = ("perceptual.",)
# Index buffers that some library versions save and others recompute (BERT's ``position_ids`` were persistent
# before transformers 4.31): an arange and zeros, identical in every file, so a difference never changes the
# computation. They are skipped with a note; every other key is loaded strictly.
VERSION_DEPENDENT_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
# safetensors metadata values are strings; these are converted back to integers when read.
INTEGER_METADATA = ("epoch", "global_step")
# Metadata keys holding a module's non-tensor extra state (JSON) under its state-dict key.
EXTRA_STATE_PREFIX = "extra_state:"
TRUST_HINT = ("if you trust where the file comes from, pass --trust-checkpoint (test.py, synthesize.py, main.py, "
              "convert_checkpoint.py) or set trust_checkpoint: true in the config; or convert it once to "
              "safetensors with: python pipeline/convert_checkpoint.py --trust-checkpoint IN OUT.safetensors")

_trusted: ContextVar[bool] = ContextVar("trust_checkpoint", default=False)


class UntrustedCheckpointError(DataError):
    """A checkpoint needs types outside the allow-list to be unpickled, and it was not trusted explicitly."""


@contextlib.contextmanager
def checkpoint_trust(trust: bool = True) -> Iterator[None]:
    """Within the block, checkpoints are read with full unpickling when ``trust`` (may run the file's code)."""
    token = _trusted.set(bool(trust))
    try:
        yield
    finally:
        _trusted.reset(token)


def lightning_allow_list(trust: bool = False) -> contextlib.AbstractContextManager:
    """A context in which a library's own ``torch.load(weights_only=True)`` (Lightning's resume) accepts the
    allow-list too; nothing to do when the checkpoint is trusted."""
    return contextlib.nullcontext() if trust else torch.serialization.safe_globals(list(allowed_globals()))


def trusted() -> bool:
    """Whether checkpoints read now are trusted (see :func:`checkpoint_trust`)."""
    return _trusted.get()


def _qualified_name(entry: Any) -> str:
    return entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"


@functools.lru_cache(maxsize=1)
def allowed_globals() -> tuple:
    """The allow-list: classes and functions that build plain data only, as ``torch.serialization.safe_globals``
    takes them (an object, or ``(object, name)`` for a name other library versions pickle it under)."""
    import numpy as np
    import omegaconf
    from lightning_fabric.utilities.data import AttributeDict as FabricAttributeDict
    from omegaconf import base, nodes
    from pytorch_lightning.utilities.parsing import AttributeDict

    omegaconf_types = [omegaconf.DictConfig, omegaconf.ListConfig, base.Metadata, base.ContainerMetadata,
                       *(getattr(nodes, name) for name in ("AnyNode", "StringNode", "IntegerNode", "FloatNode",
                                                           "BooleanNode", "BytesNode", "PathNode", "EnumNode")
                         if hasattr(nodes, name))]
    scalar, reconstruct = np._core.multiarray.scalar, np._core.multiarray._reconstruct
    numpy_types = [np.ndarray, np.dtype, scalar, reconstruct, (scalar, "numpy.core.multiarray.scalar"),
                   (reconstruct, "numpy.core.multiarray._reconstruct"),
                   *(getattr(np.dtypes, name) for name in np.dtypes.__all__)]
    python_types = [dict, list, int, float, bool, str, bytes, complex, frozenset, slice, range, typing.Any,
                    collections.OrderedDict, collections.defaultdict, collections.deque, collections.Counter,
                    argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.PureWindowsPath,
                    (pathlib.PosixPath, "pathlib._local.PosixPath")]
    # A concrete WindowsPath cannot be built on Linux (and vice versa): other systems' paths are read as pure paths.
    python_types += [(pathlib.PureWindowsPath, name) for name in ("pathlib.WindowsPath", "pathlib._local.WindowsPath")]
    # Lightning's AttributeDict (a dict subclass) cannot be rebuilt by the weights-only unpickler: it is read as
    # the plain dict it holds.
    lightning_types = [(dict, _qualified_name(AttributeDict)), (dict, _qualified_name(FabricAttributeDict))]
    return tuple(omegaconf_types + numpy_types + python_types + lightning_types)


def _refused_types(path: Path, error: Exception) -> list[str]:
    """The globals of ``path`` outside the allow-list (empty when the error was not about a global)."""
    allowed = {_qualified_name(entry) for entry in allowed_globals()}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - a legacy (non-zip) file: fall back to the unpickler's message
        names = re.findall(r"GLOBAL ([\w.]+)", str(error))
    return sorted({name for name in names if name not in allowed})


def encode_extra_state(extra_state: Mapping[str, Any], source: str) -> dict[str, str]:
    """safetensors metadata entries for the non-tensor state-dict entries (JSON; DataError when not JSON data)."""
    encoded = {}
    for key, value in extra_state.items():
        try:
            encoded[EXTRA_STATE_PREFIX + key] = json.dumps(value, sort_keys=True)
        except (TypeError, ValueError):
            raise DataError(f"{source}: state_dict entry {key} is a {type(value).__name__}, neither a tensor nor "
                            "JSON data; safetensors cannot hold it") from None
    return encoded


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable safetensors file ({error})") from None
    for key in [key for key in metadata if key.startswith(EXTRA_STATE_PREFIX)]:
        try:
            tensors[key[len(EXTRA_STATE_PREFIX):]] = json.loads(metadata.pop(key))
        except ValueError:
            raise DataError(f"{path}: metadata {key} is not valid JSON") from None
    content: dict[str, Any] = {"state_dict": tensors, "metadata": metadata}
    for key in INTEGER_METADATA:
        if str(metadata.get(key, "")).lstrip("-").isdigit():
            content[key] = int(metadata[key])
    return content


def read_checkpoint(path: str | os.PathLike, trust: bool | None = None) -> Any:
    """The content of the checkpoint at ``path``, tensors on the CPU: a Lightning checkpoint dict, a bare state
    dict, or for ``.safetensors`` ``{"state_dict", "metadata"[, "epoch", "global_step"]}``.

    ``trust`` (default: :func:`trusted`) allows full unpickling; otherwise a file needing types outside
    :func:`allowed_globals` raises UntrustedCheckpointError naming them."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"{path}: checkpoint not found")
    if path.suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    trust = trusted() if trust is None else bool(trust)
    # Memory-mapping (zip-format files, all torch >= 1.6 writes) halves the read time of a release checkpoint and
    # keeps its tensors in reclaimable file pages (bench/checkpoint_loading.py).
    mmap = zipfile.is_zipfile(path)
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        with torch.serialization.safe_globals(list(allowed_globals())):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        refused = [] if trust else _refused_types(path, error)
        if refused:
            raise UntrustedCheckpointError(
                f"{path}: refused: the file needs {', '.join(refused)}, outside the allow-list of plain data "
                f"types (unpickling may run code); {TRUST_HINT}") from None
        detail = str(error).split("WeightsUnpickler error:")[-1].strip().split("\n")[0]  # torch's advice dropped
        raise DataError(f"{path}: cannot read the checkpoint, damaged or not a PyTorch file ({detail[:200]})") from None
    except Exception as error:  # torch.load raises many types for a damaged file
        raise DataError(f"{path}: cannot read the checkpoint ({type(error).__name__}: {error})") from None


def state_dict_of(content: Any, source: str) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of checkpoint content (or the content itself when it is a bare state dict)."""
    state = content.get("state_dict", content) if isinstance(content, Mapping) else None
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{source}: not a checkpoint (expected a dict with a 'state_dict' of tensors)")
    return dict(state)


def read_state_dict(path: str | os.PathLike, trust: bool | None = None) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of the checkpoint (Lightning, bare state dict or safetensors) at ``path``, on the CPU."""
    return state_dict_of(read_checkpoint(path, trust), str(path))


def tensor_shape(value) -> tuple | None:
    """Shape of a tensor entry; ``None`` for the non-tensor extra state a module may store."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def model_key_shapes(model_config: Mapping) -> dict[str, tuple | None]:
    """Key -> shape of the model a ``target/params`` block builds, on the meta device (nothing allocated, no weight
    file read: its checkpoints are unset and a training loss is left out)."""
    from omegaconf import DictConfig, OmegaConf

    from ldm.util import instantiate_from_config

    block = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(model_config), resolve=True))
    params = block.setdefault("params", {})
    params.ckpt_path = None
    if "lossconfig" in params:
        params.lossconfig = {"target": "torch.nn.Identity"}
    if isinstance(params.get("first_stage_config"), DictConfig):
        params.first_stage_config.setdefault("params", {}).ckpt_path = None
    with torch.device("meta"):
        model = instantiate_from_config(block, key_path="model")
    return {key: tensor_shape(value) for key, value in model.state_dict().items()}


def _matches(key: str, prefixes: Iterable[str]) -> bool:
    return any(key.startswith(prefix) for prefix in prefixes)


def version_dependent(key: str) -> bool:
    """True for a key that library versions save or not without any effect on the computation."""
    return key.endswith(VERSION_DEPENDENT_SUFFIXES)


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")


def fit_state(state: Mapping[str, Any], own: Mapping[str, tuple | None], ignore_keys: Iterable[str] = (),
              strict: bool = True, source: str = "checkpoint") -> tuple[list[str], list[str], list[str]]:
    """Match ``state`` with a model's key -> shape map ``own`` the way :func:`load_weights` loads it; returns
    ``(keys to load, skipped missing, skipped unexpected)``. When ``strict``, a missing or unexpected key or a shape
    mismatch raises MissingWeightsError listing them (``source``: the file, named first in the message)."""
    ignore = tuple(ignore_keys)
    wanted = {k: v for k, v in state.items() if not _matches(k, ignore) and not _matches(k, TEST_ONLY_PREFIXES)}
    missing = [k for k in own if k not in wanted and not _matches(k, ignore)]
    unexpected = [k for k in wanted if k not in own]
    tolerated_missing = [k for k in missing if version_dependent(k)]
    tolerated_unexpected = [k for k in unexpected if version_dependent(k)]
    if tolerated_missing or tolerated_unexpected:
        warnings.warn(f"{source}: skipped {_listed(tolerated_missing + tolerated_unexpected)}: index buffers that "
                      "library versions save or recompute differently; the computation is the same")
        missing = [k for k in missing if k not in tolerated_missing]
        unexpected = [k for k in unexpected if k not in tolerated_unexpected]
    ignored_missing = [k for k in own if k not in state and _matches(k, ignore)]
    ignored_unexpected = [k for k in state if k not in own and _matches(k, ignore)]
    fitting = [k for k, v in wanted.items() if k in own and tensor_shape(v) == own[k]]
    mismatched = [f"{k} {tensor_shape(v)} vs {own[k]}" for k, v in wanted.items() if k in own and k not in fitting]
    if strict and (missing or unexpected or mismatched):
        details = [f"{title}: {_listed(keys)}" for title, keys in
                   (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
        raise MissingWeightsError(f"{source}: does not fit the model ({'; '.join(details)})")
    skipped_missing = missing + ignored_missing + tolerated_missing
    return fitting, skipped_missing, unexpected + ignored_unexpected + tolerated_unexpected


def load_weights(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    ignore_keys: Iterable[str] = (),
    strict: bool = True,
    source: str = "checkpoint",
) -> tuple[list[str], list[str]]:
    """Load ``state`` into ``module``; keys starting with an ``ignore_keys`` prefix are neither loaded nor required.

    Strict by default: any other missing or unexpected key, or a shape mismatch, raises MissingWeightsError that
    lists them; only version-dependent index buffers (``VERSION_DEPENDENT_SUFFIXES``) are skipped, with a warning.
    Returns ``(missing, unexpected)``: the keys that were skipped (ignored and version-dependent ones when strict).
    """
    own = {key: tensor_shape(value) for key, value in module.state_dict().items()}
    fitting, missing, unexpected = fit_state(state, own, ignore_keys, strict, source)
    module.load_state_dict({key: state[key] for key in fitting}, strict=False)
    return missing, unexpected


def load_checkpoint(
    module: nn.Module, path: str | os.PathLike, ignore_keys: Iterable[str] = (), strict: bool = True
) -> tuple[list[str], list[str]]:
    """Read the checkpoint at ``path`` safely and load it into ``module`` (see :func:`load_weights`)."""
    return load_weights(module, read_state_dict(path), ignore_keys=ignore_keys, strict=strict, source=str(path))
