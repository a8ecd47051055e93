"""``LesionDataset``: the one dataset of LesionDiffusion (VQ-GAN, LINet and LMNet training; LMNet/LINet inference).

Inputs are list files (:mod:`ldm.data.lists`), one line per case: ``image_list`` (CT, HU), ``label_list``
(0 background, 1 organ, 2 lesion; at inference the lesion boxes), ``type_list`` (reports,
:mod:`ldm.data.attributes`), ``seg_list`` and ``coarseg_list`` (TotalSegmentator organ segmentations; v1 ids,
or v2 converted with ``seg_version: v2``). Arrays are ``(z, y, x)`` (:mod:`ldm.data.volume`).

Mode (as the original): ``max_mask_num`` set -> inference; otherwise training, LMNet when ``seg_list`` is given,
VQ/LINet when not. Items, ``D, H, W = crop_shape`` in training, the whole volume at inference:

=====================  ===========================================  ==========================================
mode / key             dtype, shape                                 values
=====================  ===========================================  ==========================================
LMNet training
 ``seg``               float32 [1, D, H, W]                         v1 organ ids / 104 (from ``seg_list``)
 ``target``            int64 [1, D, H, W]                           {0, 1} organ of the selected report key
                                                                    (lung lobe: union of the report's lobes)
 ``label``             int64 [1, D, H, W]                           {0, 1} largest lesion component
 ``text``              dict[str, str]                               LMNet attributes, ``cavity`` last
 ``image_path``, ``crop``  str, dict of int lists                  the CT is never read in this mode
VQ / LINet training
 ``image``             float32 [1, D, H, W]                         [0, 1] (HU map; padding is air = 0)
 ``label``             int64 [D, H, W]                              {0, 1, 2} (every lesion in the crop)
 ``text``              dict[str, str] (with ``type_list``)          LINet attributes, ``CT value`` "57.0 HU,"
 ``image_path``, ``crop``
inference
 ``label``             int64 [Z, Y, X]                              {0, 1, 2} (2 = lesion boxes)
 ``seg``, ``coarseg``  int64 [Z, Y, X] (when listed)                v1 organ ids
 ``image``             float32 [1, Z, Y, X] (no ``seg_list``)       [0, 1]
 ``type``              dict (with ``type_list``)                    the raw report
 ``max_mask_num``, ``crop_size``  int, list of 3 ints
 ``spacing``           list of 3 floats                             mm (z, y, x) of the returned arrays
 ``image_path``, ``label_path``, ``type_path``, ``seg_path``, ``coarseg_path``   str (the given lists)
=====================  ===========================================  ==========================================

``crop`` = :meth:`ldm.data.crops.CropWindow.as_dict` (``crop_start``, ``crop_size``, ``full_size``,
``pad_before``, ``crop_center``, ``flipped``): the crop is centred on the largest lesion component (face
connectivity), shifted inside the volume, and padded (CT with air, labels with 0) where the volume is smaller.

Bad cases (unreadable file, inconsistent shapes, no lesion voxel, malformed report ...) raise a DataError naming
the case and the file. With ``skip_bad_cases`` the case is logged, remembered, and the next case in list order
is returned instead; when every case has failed a DataError is raised. Only DataErrors are skipped: a bug
is never hidden. (The original retried random cases forever.)

Randomness (``random_sample``, ``augment``) comes from a numpy generator seeded with ``seed`` (or torch's seed),
the DataLoader worker seed and the DDP rank: reproducible under ``seed_everything``, different across workers,
ranks and epochs.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from ldm.data.attributes import (linet_attributes, lmnet_attributes, organ_mask, report_attributes, resolve_cavity,
                                 select_organ_key)
from ldm.data.cases import LoadedCase, load_case
from ldm.data.crops import (CropWindow, bbox_center, draw_flips, draw_offset, largest_component, plan_crop, take_crop,
                            with_flips)
from ldm.data.intensity import AIR_HU, HU_KNOTS, UNIT_KNOTS, check_knots, hu_to_unit
from ldm.data.lists import read_aligned_lists
from ldm.data.organs import NUM_V1_CLASSES
from ldm.data.resample import as_spacing
from ldm.errors import ConfigError, DataError
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)

LMNET_TRAINING, IMAGE_TRAINING, INFERENCE = "lmnet_training", "image_training", "inference"
FLIP_PROBABILITY = 0.5


def _three_ints(value: Any, name: str, minimum: int) -> tuple[int, int, int]:
    values = [value] * 3 if isinstance(value, (int, np.integer)) else list(value)
    if len(values) != 3 or any(not isinstance(v, (int, np.integer)) or v < minimum for v in values):
        raise ConfigError(f"{name} must be one integer or three integers (z, y, x) >= {minimum}, got {value!r}")
    return tuple(int(v) for v in values)


class LesionDataset(Dataset):
    """Cases from aligned list files, as items for one of the three modes (module docstring).

    Parameters of the original kept with their meaning: ``image_list``, ``label_list``, ``type_list``,
    ``seg_list``, ``coarseg_list``, ``random_sample`` (each item draws a random case), ``iter_num`` (epoch length
    when non-zero; indices wrap around the cases), ``crop_shape`` (training crop; at inference the crop size
    passed to the model), ``max_mask_num`` (inference mode), ``num`` (use the first ``num`` cases),
    ``transform`` (now honoured: a callable or a ``{target, params}`` block, applied to every item),
    ``load_memory`` (read every case once, in the constructor), ``respacing``/``target_spacing`` (resample to
    ``target_spacing`` mm: one number or (z, y, x)). ``batch_size`` and ``class_num`` are accepted and unused,
    as in the original. ``normalize`` is accepted for old configs: the HU map of :mod:`ldm.data.intensity` is
    always applied to the CT; ``thresh_ls``/``norm_ls`` replace its HU and [0, 1] knots.

    New: ``seg_version`` ('v1' or 'v2'), ``skip_bad_cases``, ``augment`` (training only: ``False`` or
    ``{jitter: voxels (one or three ints, each < half the crop), flip: bool or list of (z, y, x) axes}``; ``True``
    for ``flip`` means all three axes), ``seed``.
    """

    def __init__(self, image_list: str | None = None, label_list: str | None = None, type_list: str | None = None,
                 seg_list: str | None = None, coarseg_list: str | None = None, random_sample: bool = False,
                 iter_num: int = 0, crop_shape: Sequence[int] | None = None, max_mask_num: int | None = None,
                 num: int | None = None, batch_size: int = 0, class_num: int = 3,
                 transform: Callable | Mapping | None = None, load_memory: bool = False, respacing: bool = False,
                 target_spacing: float | Sequence[float] = 1.0, normalize: bool = False,
                 thresh_ls: Sequence[float] | None = None, norm_ls: Sequence[float] | None = None,
                 seg_version: str = "v1", skip_bad_cases: bool = False, augment: bool | Mapping = False,
                 seed: int | None = None) -> None:
        super().__init__()
        if not image_list or not label_list:
            raise ConfigError("LesionDataset: image_list and label_list are required")
        if max_mask_num is not None and (not isinstance(max_mask_num, int) or max_mask_num < 1):
            raise ConfigError(f"LesionDataset: max_mask_num must be a positive integer or null, got {max_mask_num!r}")
        self.mode = INFERENCE if max_mask_num is not None else (LMNET_TRAINING if seg_list else IMAGE_TRAINING)
        if self.mode == LMNET_TRAINING and not type_list:
            raise ConfigError("LesionDataset: LMNet training (seg_list given) needs type_list for the organ and text")
        if self.mode != INFERENCE and crop_shape is None:
            raise ConfigError("LesionDataset: crop_shape is required for training")
        if seg_version not in ("v1", "v2"):
            raise ConfigError(f"LesionDataset: seg_version must be 'v1' or 'v2', got {seg_version!r}")
        self.crop_shape = _three_ints(crop_shape, "crop_shape", 1) if crop_shape is not None else None
        self.image_list, self.max_mask_num, self.seg_version, self.seed = image_list, max_mask_num, seg_version, seed
        self.random_sample, self.iter_num, self.skip_bad_cases = bool(random_sample), int(iter_num or 0), skip_bad_cases
        self.batch_size, self.class_num, self.normalize = batch_size, class_num, normalize
        # The CT is read only where an item carries it: VQ/LINet training and LINet inference (no seg_list).
        self.needs_image, self.load_memory = not seg_list, bool(load_memory)
        self.hu_knots, self.unit_knots = check_knots(thresh_ls or HU_KNOTS, norm_ls or UNIT_KNOTS)
        self.target_spacing = as_spacing(target_spacing) if respacing else None
        self.transform = self._build_transform(transform)
        self.jitter, self.flip_axes = self._parse_augment(augment)
        lists = read_aligned_lists({"image_list": image_list, "label_list": label_list, "type_list": type_list,
                                    "seg_list": seg_list, "coarseg_list": coarseg_list})
        kinds = [name.removesuffix("_list") for name in lists]
        self.cases = [dict(zip(kinds, paths)) for paths in zip(*lists.values())][: num or None]
        if not self.cases:
            raise DataError(f"{image_list}: the list holds no case")
        self._bad_cases: set[int] = set()
        self._memory: dict[int, LoadedCase] = {}
        self._rng: np.random.Generator | None = None
        self._rng_owner: tuple | None = None
        if self.load_memory:
            self._preload()

    def _build_transform(self, transform: Callable | Mapping | None) -> Callable | None:
        if transform is None or callable(transform):
            return transform
        if isinstance(transform, Mapping):
            built = instantiate_from_config(transform, key_path="LesionDataset.transform")
            if callable(built):
                return built
        raise ConfigError(
            f"LesionDataset: transform must be a callable or a {{target, params}} block, got {transform!r}"
        )

    def _parse_augment(self, augment: bool | Mapping | None) -> tuple[tuple[int, int, int], tuple[int, ...]]:
        if not augment:
            return (0, 0, 0), ()
        if self.mode == INFERENCE or not isinstance(augment, Mapping):
            raise ConfigError("LesionDataset: augment must be false or {jitter, flip}, and is for training only")
        unknown = set(augment) - {"jitter", "flip"}
        if unknown:
            raise ConfigError(f"LesionDataset: unknown augment option(s) {sorted(unknown)} (expected jitter, flip)")
        jitter = _three_ints(augment.get("jitter", 0), "augment.jitter", 0)
        if any(j >= c // 2 and j > 0 for j, c in zip(jitter, self.crop_shape)):
            raise ConfigError(f"augment.jitter {list(jitter)} must stay below half the crop {list(self.crop_shape)}")
        flip = augment.get("flip", False)
        axes = (0, 1, 2) if flip is True else tuple(flip or ())
        if any(axis not in (0, 1, 2) for axis in axes):
            raise ConfigError(f"augment.flip must be true/false or a list of axes 0, 1, 2 (z, y, x), got {flip!r}")
        return jitter, tuple(sorted(set(axes)))

    def _preload(self) -> None:
        for index in range(len(self.cases)):
            try:
                self._case(index)
            except DataError as error:
                if not self.skip_bad_cases:
                    raise
                self._mark_bad(index, error)

    def __len__(self) -> int:
        return self.iter_num or len(self.cases)

    def generator(self) -> np.random.Generator:
        """This process's random generator (one per DataLoader worker and DDP rank; see the module docstring)."""
        worker = get_worker_info()
        owner = (os.getpid(), worker.id if worker is not None else None)
        if self._rng is None or self._rng_owner != owner:
            stream = worker.seed if worker is not None else torch.initial_seed()
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if distributed else 0
            seed = 0 if self.seed is None else int(self.seed)
            self._rng = np.random.default_rng([seed % 2**64, int(stream) % 2**64, rank])
            self._rng_owner = owner
        return self._rng

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        rng = self.generator()
        first = int(rng.integers(len(self.cases))) if self.random_sample else index % len(self.cases)
        for attempt in range(len(self.cases)):
            case_index = (first + attempt) % len(self.cases)
            if case_index in self._bad_cases:
                continue
            try:
                item = self._item(case_index, rng)
            except DataError as error:
                if not self.skip_bad_cases:
                    raise
                self._mark_bad(case_index, error)
                continue
            return self.transform(item) if self.transform is not None else item
        raise DataError(f"{self.image_list}: all {len(self.cases)} cases failed to load (see the warnings above)")

    def _mark_bad(self, case_index: int, error: DataError) -> None:
        self._bad_cases.add(case_index)
        log.warning("skipping bad case %d: %s", case_index, error)

    def _case(self, case_index: int) -> LoadedCase:
        case = self._memory.get(case_index)
        if case is None:
            paths = self.cases[case_index]
            try:
                case = load_case(paths, need_image=self.needs_image, seg_version=self.seg_version,
                                 target_spacing=self.target_spacing)
            except DataError as error:
                raise DataError(f"case {case_index} ({paths['image']}): {error}") from None
            if self.load_memory:
                self._memory[case_index] = case
        return case

    def _item(self, case_index: int, rng: np.random.Generator) -> dict[str, Any]:
        case = self._case(case_index)
        try:
            if self.mode == LMNET_TRAINING:
                return self._lmnet_item(case, rng)
            if self.mode == IMAGE_TRAINING:
                return self._image_item(case, rng)
            return self._inference_item(case)
        except DataError as error:
            raise DataError(f"case {case_index} ({case.paths['image']}): {error}") from None

    def _window(self, case: LoadedCase, lesion_component: np.ndarray, rng: np.random.Generator) -> CropWindow:
        offset = draw_offset(rng, self.jitter)
        window = plan_crop(case.label.shape, self.crop_shape, bbox_center(lesion_component), offset)
        return with_flips(window, draw_flips(rng, self.flip_axes, FLIP_PROBABILITY))

    def _lmnet_item(self, case: LoadedCase, rng: np.random.Generator) -> dict[str, Any]:
        component = largest_component(case.lesion)
        window = self._window(case, component, rng)
        lesion = take_crop(component, window, fill=False)
        seg = take_crop(case.seg, window, fill=0)
        organs = take_crop(case.coarseg, window, fill=0) if case.coarseg is not None else seg
        key = select_organ_key(case.report, lesion, organs)
        attributes = report_attributes(case.report, key)
        cavity = resolve_cavity(key, attributes, lesion, organ_mask(organs, case.report, key),
                                take_crop(case.lesion, window, fill=False), source=case.paths["type"])
        return {
            "seg": torch.from_numpy(seg[None].astype(np.float32) / NUM_V1_CLASSES),
            "target": torch.from_numpy(organ_mask(seg, case.report, key)[None].astype(np.int64)),
            "label": torch.from_numpy(lesion[None].astype(np.int64)),
            "text": lmnet_attributes(attributes, key, cavity),
            "image_path": case.paths["image"],
            "crop": window.as_dict(),
        }

    def _image_item(self, case: LoadedCase, rng: np.random.Generator) -> dict[str, Any]:
        window = self._window(case, largest_component(case.lesion), rng)
        image = hu_to_unit(take_crop(case.image, window, fill=AIR_HU), self.hu_knots, self.unit_knots)
        label = take_crop(case.label, window, fill=0)
        item = {
            "image": torch.from_numpy(image[None].astype(np.float32)),
            "label": torch.from_numpy(label.astype(np.int64)),
            "image_path": case.paths["image"],
            "crop": window.as_dict(),
        }
        if case.report is not None:
            organs = take_crop(case.coarseg, window, fill=0) if case.coarseg is not None else None
            key = select_organ_key(case.report, label == 2, organs)
            item["text"] = linet_attributes(report_attributes(case.report, key), key, source=case.paths["type"])
        return item

    def _inference_item(self, case: LoadedCase) -> dict[str, Any]:
        item: dict[str, Any] = {"label": torch.from_numpy(case.label.astype(np.int64))}
        for name in ("seg", "coarseg"):
            if getattr(case, name) is not None:
                item[name] = torch.from_numpy(getattr(case, name).astype(np.int64))
        if case.image is not None:
            image = hu_to_unit(case.image, self.hu_knots, self.unit_knots)
            item["image"] = torch.from_numpy(image[None].astype(np.float32, copy=False))
        if case.report is not None:
            item["type"] = case.report
        item.update(max_mask_num=self.max_mask_num, crop_size=list(self.crop_shape) if self.crop_shape else None,
                    spacing=[float(s) for s in case.spacing])
        item.update({f"{name}_path": path for name, path in case.paths.items()})
        return item

    @staticmethod
    def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Batch items: tensors are stacked (equal shapes required); everything else becomes a list per key."""
        if not items:
            raise DataError("cannot collate an empty batch")
        keys = list(items[0])
        for item in items[1:]:
            if list(item) != keys and set(item) != set(keys):
                raise DataError(f"cannot collate items with different keys: {sorted(keys)} vs {sorted(item)}")
        batch: dict[str, Any] = {}
        for key in keys:
            values = [item[key] for item in items]
            if all(isinstance(value, torch.Tensor) for value in values):
                shapes = {tuple(value.shape) for value in values}
                if len(shapes) > 1:
                    raise DataError(
                        f"cannot batch '{key}' tensors of different shapes {sorted(shapes)}; use batch_size 1"
                    )
                batch[key] = torch.stack(values)
            else:
                batch[key] = values
        return batch
