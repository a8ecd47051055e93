"""Config system: the one factory (`instantiate_from_config`), YAML loading and merging, path resolution, seeding.

Configs are OmegaConf YAML made of nested ``{target: dotted.path.Class, params: {...}}`` blocks.

Path rule (DESIGN.md §2): a string value whose key names a path (the key ends in ``_list``, ``_path``,
``_dir``, ``_file``, ``_root`` or is ``ckpt_path``/``path``) and that is relative is made absolute when the
config is loaded: against ``pipeline/`` when it comes from a YAML file, against the current directory when
it comes from a ``key=value`` override on the command line. Lists of such strings are resolved element-wise.
"""
from __future__ import annotations

import importlib
import os
import random
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.errors import ConfigError

PIPELINE_DIR = Path(__file__).resolve().parents[1]
PATH_KEY_SUFFIXES = ("_list", "_path", "_dir", "_file", "_root")
PATH_KEYS = {"ckpt_path", "path"}
SENTINELS = {"__is_first_stage__", "__is_unconditional__"}


def is_path_key(key: Any) -> bool:
    """True when a config key, by its name, holds a filesystem path."""
    return isinstance(key, str) and (key in PATH_KEYS or key.endswith(PATH_KEY_SUFFIXES))


def resolve_path(path: str | os.PathLike, base: str | os.PathLike = PIPELINE_DIR) -> str:
    """Return ``path`` made absolute against ``base`` (``~`` expanded); absolute paths are returned unchanged."""
    expanded = Path(os.path.expanduser(str(path)))
    if expanded.is_absolute():
        return str(expanded)
    return str((Path(base) / expanded).resolve())


def _resolve_tree(node: Any, base: Path, under_path_key: bool = False) -> None:
    """Resolve, in place, the relative path strings of a DictConfig/ListConfig tree."""
    if isinstance(node, DictConfig):
        for key in list(node.keys()):
            if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
                continue
            value = node[key]
            if isinstance(value, (DictConfig, ListConfig)):
                _resolve_tree(value, base, is_path_key(key))
            elif isinstance(value, str) and is_path_key(key) and value:
                node[key] = resolve_path(value, base)
    elif isinstance(node, ListConfig) and under_path_key:
        for index, value in enumerate(node):
            if isinstance(value, str) and value and not OmegaConf.is_interpolation(node, index):
                node[index] = resolve_path(value, base)


def load_yaml(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> DictConfig:
    """Load one YAML config and resolve its relative paths against ``pipeline/``.

    A top-level ``inherit: other.yaml`` (or a list of files, relative to this file's directory) loads those
    configs first and merges this one over them, so a fine-tuning or test config states only what differs.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path in _chain:
        raise ConfigError(f"{path}: 'inherit' loops back to itself ({' -> '.join(p.name for p in _chain)})")
    try:
        config = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, OSError) as error:
        raise ConfigError(f"{path}: not a valid YAML config ({' '.join(str(error).split())})") from None
    if not isinstance(config, DictConfig):
        raise ConfigError(f"{path}: the top level of a config must be a mapping")
    parents = config.pop("inherit", None)
    _resolve_tree(config, PIPELINE_DIR)
    if parents is None:
        return config
    parents = [parents] if isinstance(parents, str) else list(parents)
    loaded = [load_yaml(path.parent / str(parent), _chain + (path,)) for parent in parents]
    return OmegaConf.merge(*loaded, config)


def parse_overrides(overrides: Iterable[str], base: str | os.PathLike | None = None) -> DictConfig:
    """Turn ``a.b=c`` strings into a config; relative path values resolve against ``base`` (default: cwd)."""
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"command-line override {item!r} is not of the form key.sub=value")
    try:
        config = OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as error:
        raise ConfigError(f"command-line overrides {overrides}: {error}") from None
    _resolve_tree(config, Path(base) if base is not None else Path.cwd())
    return config


def load_config(paths: Sequence[str | os.PathLike], overrides: Iterable[str] = ()) -> DictConfig:
    """Merge several YAML configs left to right, then apply ``key.sub=value`` overrides."""
    if not paths:
        raise ConfigError("no config given: pass at least one YAML file with --base")
    configs = [load_yaml(path) for path in paths]
    configs.append(parse_overrides(overrides))
    return OmegaConf.merge(*configs)


def get_obj_from_str(string: str, reload: bool = False, key_path: str = "target") -> Any:
    """Import ``package.module.Name`` and return the named object."""
    if not isinstance(string, str) or "." not in string:
        raise ConfigError(f"{key_path}: {string!r} is not a dotted import path such as 'ldm.models.autoencoder.VQModel'")
    module_name, attribute = string.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ConfigError(f"{key_path}: cannot import module {module_name!r} for {string!r} ({error})") from None
    if reload:
        module = importlib.reload(module)
    if not hasattr(module, attribute):
        raise ConfigError(f"{key_path}: module {module_name!r} has no class or function {attribute!r}")
    return getattr(module, attribute)


def instantiate_from_config(config: Any, key_path: str = "config", **extra: Any) -> Any:
    """Build ``target(**params, **extra)`` from a ``{target, params}`` block.

    ``key_path`` names the block in error messages (e.g. ``model.params.unet_config``). The sentinel strings
    ``__is_first_stage__`` and ``__is_unconditional__`` return ``None`` as in the original code.
    """
    if isinstance(config, str) and config in SENTINELS:
        return None
    if not isinstance(config, (Mapping, DictConfig)):
        raise ConfigError(f"{key_path}: expected a mapping with a 'target' key, got {type(config).__name__}")
    if "target" not in config:
        raise ConfigError(f"{key_path}: missing 'target' (the dotted path of the class to build)")
    cls = get_obj_from_str(config["target"], key_path=f"{key_path}.target")
    params = config.get("params", None) or {}
    if isinstance(params, DictConfig):
        params = OmegaConf.to_container(params, resolve=True)
    if not isinstance(params, Mapping):
        raise ConfigError(f"{key_path}.params: expected a mapping, got {type(params).__name__}")
    return cls(**dict(params), **extra)


def seed_everything(seed: int) -> int:
    """Seed Python, NumPy and torch (all devices) with ``seed``; returns it."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    return seed


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``: pass it to samplers for reproducible draws."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(int(seed))
    return generator


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
