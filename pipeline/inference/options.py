"""The ``inference:`` block of a test config, parsed and checked once into :class:`InferenceOptions`.

Every key has a default here, so a test config states only what differs. Unknown keys are errors (a typo such as
``guidance_scal`` would otherwise be ignored silently); ``ddim_steps``, the old name of ``steps``, is still read, with
a warning. Paths: ``exp_dir`` from a YAML file resolves against
``pipeline/``, from the command line against the current directory (``ldm.util``); the entries of ``lists`` are
file names inside ``exp_dir``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from ldm.errors import ConfigError
from ldm.models.diffusion.samplers import SAMPLERS, SamplerSettings

STAGES = ("lmnet", "linet")
PRECISIONS = ("fp32", "bf16", "fp16")
VQ_DEVICES = ("same", "neighbour", "cpu")
VQ_TILING = ("auto", "always", "never")
FILL_TARGETS = ("ellipsoid", "box")
BLENDS = ("clean", "renoise")
LATENT_MASKS = ("max_pool", "nearest")
# Input lists each stage reads from the experiment folder (``preprocess.py`` writes the first four, LMNet the last).
DEFAULT_LISTS = {
    "lmnet": {"image": "img_list.txt", "boxes": "bbox_list.txt", "type": "type_list.txt", "seg": "seg_list.txt"},
    "linet": {"image": "img_list.txt", "label": "label_list.txt", "type": "type_list.txt", "seg": "seg_list.txt"},
}
DEFAULT_CROPS = {"lmnet": (64, 152, 152), "linet": (128, 128, 128)}
# The original's thresholds were 0.9, 0.8, ..., 0.3; a finer grid lets the volume match its target more closely.
DEFAULT_THRESHOLDS = tuple(round(0.9 - 0.05 * index, 2) for index in range(13))


@dataclass(frozen=True)
class InferenceOptions:
    """Settings of one inference run (docs/reference.md lists each key; docs/inference.md says what it does)."""

    stage: str
    exp_dir: Path | None = None
    lists: Mapping[str, str] = field(default_factory=dict)
    label_list_name: str = "label_list.txt"
    seg_version: str = "v1"
    max_mask_num: int = 3
    min_component_voxels: int = 50
    crop_size: tuple[int, int, int] = (64, 152, 152)
    # Sampling: a sampler of ``ldm.models.diffusion.samplers.SAMPLERS``, its steps, DDIM's eta and the timestep
    # spacing (``auto``: the sampler's own default); :attr:`sampling` gathers them.
    sampler: str = "ddim"
    steps: int = 200
    eta: float = 1.0
    timestep_spacing: str = "auto"
    guidance_scale: float = 1.0
    seed: int = 23
    use_ema: bool = True
    precision: str = "fp32"
    device: str = "auto"
    vq_device: str = "same"
    # LINet's VQ runs in tiles when the latent exceeds ``vq_tile`` voxels on an axis (``vq_tiling: auto``). A VQ that
    # streams (``ldm.models.streaming.supports_streaming``: no attention layers, as the release and demo VQs) runs
    # every layer over tiles of ``vq_tile`` latent voxels (``vq_tile`` x factor image voxels when encoding) without
    # overlap, exactly; ``vq_tile_overlap`` is then unused. Only a VQ that cannot stream (``attn_resolutions`` not
    # empty, conv shortcuts, resampling without conv) uses overlapping tiles with that overlap (latent voxels).
    vq_tiling: str = "auto"
    vq_tile: int = 96
    vq_tile_overlap: int = 48
    overwrite: bool = False
    preview: bool = True
    progress: bool = True
    batch_size: int = 1
    batch_memory_mb: float = 0.0
    # Voxel size (mm; one value or z, y, x) the model was trained at, and how far a case may be off it on any axis
    # before a warning names it (None: no check). The release models were trained at 1 mm.
    training_spacing_mm: tuple[float, float, float] | None = None
    spacing_tolerance_mm: float = 0.1
    # LMNet
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    fill_target: str = "ellipsoid"
    min_fill: float = 0.3
    attempts: int = 3
    fill_holes: bool = True
    # LINet
    blend: str = "clean"
    # How the lesion mask reaches the latent grid: max-pooling (every latent voxel touching the lesion) or the
    # nearest-neighbour downsampling of training and of the original's inference.
    latent_mask: str = "max_pool"
    rim_mm: float = 2.0
    match_surroundings: bool = True
    hu_tolerance: float = 150.0
    quality_gate: bool = False
    # Best of K and resampling (:mod:`inference.candidates`): samples per lesion, and further rounds for a lesion
    # that fails the gate's checks of its stage.
    candidates: int = 1
    resample_failed: int = 0

    @property
    def sampling(self) -> SamplerSettings:
        """The sampler settings of these options, as the models' ``sample`` takes them."""
        spacing = None if self.timestep_spacing == "auto" else self.timestep_spacing
        return SamplerSettings(self.sampler, self.steps, self.eta, spacing)

    def with_overrides(self, **values: Any) -> "InferenceOptions":
        """A copy with some settings replaced (``None`` values are ignored), checked again."""
        return check(replace(self, **{key: value for key, value in values.items() if value is not None}))


def _fail(key: str, message: str) -> ConfigError:
    return ConfigError(f"inference.{key}: {message}")


def _choice(options: InferenceOptions, key: str, allowed: tuple[str, ...]) -> None:
    if getattr(options, key) not in allowed:
        raise _fail(key, f"{getattr(options, key)!r} is not one of {', '.join(allowed)}")


def _at_least(options: InferenceOptions, key: str, minimum: float, kind: type | tuple = (int, float)) -> None:
    value = getattr(options, key)
    if isinstance(value, bool) or not isinstance(value, kind) or value < minimum:
        noun = "an integer" if kind is int else "a number"
        raise _fail(key, f"must be {noun} >= {minimum}, got {value!r}")


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _check_training_spacing(options: InferenceOptions) -> InferenceOptions:
    """``options`` with ``training_spacing_mm`` as a (z, y, x) tuple (one number counts for every axis)."""
    spacing = options.training_spacing_mm
    if spacing is None:
        return options
    if _positive_number(spacing):
        return replace(options, training_spacing_mm=(float(spacing),) * 3)
    if isinstance(spacing, (list, tuple)) and len(spacing) == 3 and all(_positive_number(v) for v in spacing):
        return replace(options, training_spacing_mm=tuple(float(v) for v in spacing))
    raise _fail("training_spacing_mm", f"must be a positive number or three (z, y, x) in mm, got {spacing!r}")


def check(options: InferenceOptions) -> InferenceOptions:
    """Validate every setting; returns ``options`` or raises a ConfigError naming the key."""
    for key, allowed in (("stage", STAGES), ("sampler", tuple(SAMPLERS)), ("precision", PRECISIONS),
                         ("vq_device", VQ_DEVICES), ("vq_tiling", VQ_TILING), ("fill_target", FILL_TARGETS),
                         ("blend", BLENDS), ("latent_mask", LATENT_MASKS), ("seg_version", ("v1", "v2"))):
        _choice(options, key, allowed)
    for key, minimum in (("max_mask_num", 1), ("min_component_voxels", 0), ("steps", 1), ("attempts", 1),
                         ("vq_tile", 2), ("vq_tile_overlap", 0), ("seed", 0), ("batch_size", 1),
                         ("candidates", 1), ("resample_failed", 0)):
        _at_least(options, key, minimum, int)
    for key in ("eta", "min_fill", "hu_tolerance", "rim_mm", "batch_memory_mb", "spacing_tolerance_mm"):
        _at_least(options, key, 0.0)
    for key in ("use_ema", "overwrite", "preview", "progress", "fill_holes", "match_surroundings", "quality_gate"):
        if not isinstance(getattr(options, key), bool):
            raise _fail(key, f"must be true or false, got {getattr(options, key)!r}")
    if not isinstance(options.guidance_scale, (int, float)) or isinstance(options.guidance_scale, bool):
        raise _fail("guidance_scale", f"must be a number, got {options.guidance_scale!r}")
    if len(options.crop_size) != 3 or any(not isinstance(s, int) or s < 1 for s in options.crop_size):
        raise _fail("crop_size", f"must be three positive integers (z, y, x), got {list(options.crop_size)}")
    if not options.thresholds or any(not 0.0 < t < 1.0 for t in options.thresholds):
        raise _fail("thresholds", f"must be a non-empty list of numbers in (0, 1), got {list(options.thresholds)}")
    _choice(options, "timestep_spacing", ("auto", *SAMPLERS[options.sampler].spacings))
    options = _check_training_spacing(options)
    if options.vq_tile_overlap >= options.vq_tile:
        raise _fail("vq_tile_overlap", f"{options.vq_tile_overlap} must be smaller than vq_tile {options.vq_tile}")
    missing = set(DEFAULT_LISTS[options.stage]) - set(options.lists)
    if missing:
        raise _fail("lists", f"the {options.stage} stage needs the lists {sorted(missing)}")
    for name, file_name in options.lists.items():
        if not isinstance(file_name, str) or not file_name or Path(file_name).is_absolute():
            raise _fail(f"lists.{name}", f"must be a file name inside exp_dir, got {file_name!r}")
    return options


def _plain(block: Any) -> dict[str, Any]:
    if block is None:
        return {}
    if isinstance(block, DictConfig):
        return OmegaConf.to_container(block, resolve=True)
    if isinstance(block, Mapping):
        return dict(block)
    raise ConfigError(f"inference: expected a mapping of settings, got {type(block).__name__}")


def parse_options(block: Any, stage: str) -> InferenceOptions:
    """:class:`InferenceOptions` for ``stage`` (``lmnet``/``linet``) from the ``inference:`` mapping of a config."""
    values = _plain(block)
    if "ddim_steps" in values:
        old = values.pop("ddim_steps")
        warnings.warn(f"inference.ddim_steps is deprecated, use inference.steps (ddim_steps={old} used)",
                      FutureWarning, stacklevel=2)
        values["steps"] = old
    known = {item.name for item in fields(InferenceOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"inference: unknown setting(s) {unknown}; known: {sorted(known - {'stage'})}")
    if stage not in STAGES:
        raise ConfigError(f"unknown inference stage {stage!r} (expected one of {', '.join(STAGES)})")
    configured_stage = values.pop("stage", stage)
    if configured_stage != stage:
        raise _fail("stage", f"{configured_stage!r} does not match the model, which is a {stage} model")
    lists = {**DEFAULT_LISTS[stage], **(values.pop("lists", None) or {})}
    size = values.pop("crop_size", DEFAULT_CROPS[stage])
    values["crop_size"] = tuple(size) if isinstance(size, (list, tuple)) else (size,) * 3
    if "thresholds" in values:
        thresholds = values["thresholds"]
        if not isinstance(thresholds, (list, tuple)) or not all(isinstance(t, (int, float)) for t in thresholds):
            raise _fail("thresholds", f"must be a list of numbers in (0, 1), got {thresholds!r}")
        values["thresholds"] = tuple(float(t) for t in thresholds)
    if values.get("exp_dir") is not None:
        values["exp_dir"] = Path(values["exp_dir"])
    return check(InferenceOptions(stage=stage, lists=lists, **values))
