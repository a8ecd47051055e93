"""LMNet inference: a lesion mask for every lesion box of a case, written as ``<case>/samples_<k>.nii.gz``.

Per case (the CT's grid; boxes = value 2 of the box file, see :mod:`inference.plan` for which boxes):

1. for each box, largest first: a crop of ``crop_size`` centred on the box (padded where the volume is smaller);
   the organ is the report key overlapping the box most; the box must overlap that organ, else the case fails
   ("no room");
2. the text is the report's LMNet attributes with the report's own ``cavity`` (a rule on the masks only when the
   report has none; the original ignored the report and guessed from directory names);
3. LMNet samples a mask (seeded per case, box and attempt); :mod:`inference.thresholds` turns it into one lesion
   inside the box that keeps a voxel away from earlier lesions; when the lesion is smaller than ``min_fill`` of
   the target volume another attempt is sampled, and the best of ``attempts`` is kept (first attempts of boxes
   that do not reach each other share a UNet batch, with the one-by-one result: :mod:`inference.box_batches`);
   with ``candidates`` / ``resample_failed`` a box is drawn several times and the best-agreeing mask is kept
   (:mod:`inference.candidates`);
4. the output holds 1 for the organs of the boxes and 2 for the lesions (uint8, the CT's affine and shape).

Use from Python: ``sample_masks(model, read_cases(exp_dir, options.lists), options)``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ldm.data.attributes import lmnet_attributes, organ_mask, report_attributes, resolve_cavity, select_organ_key
from ldm.data.cases import load_case
from ldm.data.crops import paste_crop, take_crop
from ldm.data.organs import NUM_V1_CLASSES, organ_name
from ldm.data.volume import Geometry, read_volume, write_volume
from ldm.errors import ConfigError, DataError
from ldm.models.diffusion.mask import MaskDiffusion
from inference.batching import run_cases
from inference.box_batches import BoxWaves, ItemInputs, sample_items, slices_meet
from inference.candidates import (Agreement, JudgedCase, LesionJudge, chunks, record_selection, require_judge,
                                  select)
from inference.cases import CaseSpec, output_path
from inference.common import case_grid, check_crop, unet_factor
from inference.devices import autocast, autocast_dtype
from inference.options import InferenceOptions
from inference.plan import Component, lesion_seed, plan_components
from inference.previews import write_lesion_preview
from inference.results import CaseResult, LesionResult
from inference.thresholds import Candidate, blocked_region, choose_threshold

ORGAN_VALUE, LESION_VALUE = 1, 2


@dataclass
class MaskInputs:
    """One case in memory: the boxes (label values), v1 segmentation, report and the CT grid."""

    boxes: np.ndarray
    seg: np.ndarray
    report: dict
    geometry: Geometry
    report_path: str


def read_mask_inputs(case: CaseSpec, options: InferenceOptions) -> MaskInputs:
    """Read and check a case's box file, segmentation and report (DataError naming the file otherwise)."""
    paths = {"image": case.paths["image"], "label": case.paths["boxes"], "type": case.paths["type"],
             "seg": case.paths["seg"]}
    loaded = load_case(paths, need_image=False, seg_version=options.seg_version)
    geometry = case_grid(paths["image"], paths["label"], loaded.label.shape)
    return MaskInputs(loaded.label, loaded.seg, loaded.report, geometry, paths["type"])


def check_mask_model(model: torch.nn.Module, options: InferenceOptions) -> None:
    """ConfigError unless ``model`` is an LMNet whose UNet accepts crops of ``options.crop_size``."""
    if not isinstance(model, MaskDiffusion):
        raise ConfigError(f"the LMNet stage needs a MaskDiffusion model, got {type(model).__name__}")
    check_crop(options.crop_size, unet_factor(model), "the LMNet UNet halves each axis that often")


def _conditioning(model: MaskDiffusion, seg: np.ndarray, organ: np.ndarray, box: np.ndarray) -> torch.Tensor:
    def channel(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]

    return model.condition_volume(channel(seg / NUM_V1_CLASSES), channel(organ), channel(box))


@dataclass
class BoxSetup:
    """What one box's sampling takes that no other box changes: crops of its window, organ key and text."""

    component: Component
    box: np.ndarray
    organ: np.ndarray
    key: str
    attributes: dict
    cond: torch.Tensor


def box_setup(model: MaskDiffusion, inputs: MaskInputs, component: Component) -> BoxSetup:
    """The fixed inputs of one box; DataError when the box does not overlap the organ it is assigned to."""
    window = component.window
    box = take_crop(component.box_mask(), window, fill=False)
    seg = take_crop(inputs.seg, window, fill=0)
    key = select_organ_key(inputs.report, box, seg)
    organ = organ_mask(seg, inputs.report, key)
    if not (organ & box).any():
        where = [(b.start, b.stop) for b in component.bbox]
        raise DataError(f"box {component.rank} at {where} (z, y, x) does not overlap the {organ_name(key)} "
                        f"(v1 id {key}) of the segmentation: no room for a lesion of that organ there")
    return BoxSetup(component, box, organ, key, report_attributes(inputs.report, key),
                    _conditioning(model, seg, organ, box))


def box_cavity(setup: BoxSetup, inputs: MaskInputs, occupied: np.ndarray) -> str:
    """The box's cavity phrase with the lesions of ``occupied`` placed so far (the only input of its UNet call
    that earlier boxes change)."""
    return resolve_cavity(setup.key, setup.attributes, setup.box, setup.organ,
                          take_crop(occupied, setup.component.window, fill=False), source=inputs.report_path)


def box_item(model: MaskDiffusion, setup: BoxSetup, cavity: str, seed: int) -> ItemInputs:
    """The UNet call of one box attempt: conditioning volume, attribute context and seed."""
    context = model.encode_context([lmnet_attributes(setup.attributes, setup.key, cavity)])
    return ItemInputs((setup.cond, context), seed)


def _sampler(model: MaskDiffusion, options: InferenceOptions, precision: torch.dtype | None,
             step_progress: bool) -> Callable[[Sequence[ItemInputs]], list[torch.Tensor]]:
    def sample(items: Sequence[ItemInputs]) -> list[torch.Tensor]:
        with autocast(model.device, precision):
            return sample_items(model, items, sampling=options.sampling, guidance_scale=options.guidance_scale,
                                use_ema=options.use_ema, progress=step_progress)

    return sample


@dataclass
class MaskCandidate:
    """One draw of a box: the lesion chosen from its best attempt (crop shape), that attempt's seed, attempts made."""

    choice: Candidate
    seed: int
    attempts: int


# A draw without a lesion voxel has no volume: it ranks below any draw that has one.
EMPTY_MASK = Agreement(disagree=("volume",), failing=("volume",))


def mask_candidate(model: MaskDiffusion, setup: BoxSetup, cavity: str, blocked: np.ndarray, first: torch.Tensor,
                   draw: int, case_index: int, options: InferenceOptions,
                   sample: Callable[[Sequence[ItemInputs]], list]) -> MaskCandidate:
    """The lesion of one draw of a box: ``first`` is its first attempt's sample; when the lesion is smaller than
    ``min_fill`` of the target another attempt is sampled (alone), and the closest to the target of ``attempts``
    is kept."""
    best, best_seed, attempts = None, None, 0
    for attempt in range(options.attempts):
        seed = lesion_seed(options.seed, "lmnet", case_index, setup.component.rank, attempt, draw)
        raw = first if attempt == 0 else sample([box_item(model, setup, cavity, seed)])[0]
        candidate = choose_threshold(raw[0, 0].float().cpu().numpy(), setup.box, blocked, options.thresholds,
                                     options.fill_target, options.fill_holes)
        attempts += 1
        if best is None or abs(candidate.voxels - candidate.target_voxels) < abs(best.voxels - best.target_voxels):
            best, best_seed = candidate, seed
        if candidate.voxels > 0 and candidate.fill >= options.min_fill:
            break
    return MaskCandidate(best, best_seed, attempts)


@torch.no_grad()
def sample_box(model: MaskDiffusion, inputs: MaskInputs, setup: BoxSetup, occupied: np.ndarray, case_index: int,
               options: InferenceOptions, waves: BoxWaves, sample: Callable[[Sequence[ItemInputs]], list],
               judge: LesionJudge | None = None, judged: JudgedCase | None = None) -> tuple[np.ndarray, LesionResult]:
    """Sample the lesion of one box (its turn: ``occupied`` holds every earlier lesion); the first attempt of draw
    0 comes from ``waves``, the first attempts of further draws (best of K, resampling: :mod:`inference.candidates`,
    judged by ``judge`` on ``judged``) are sampled in batches of ``batch_size``, further attempts alone. Returns
    the full-volume lesion mask and its record."""
    start = time.perf_counter()
    component = setup.component
    cavity = box_cavity(setup, inputs, occupied)
    blocked = blocked_region(take_crop(occupied, component.window, fill=False))

    def draw(numbers: list[int]) -> list[MaskCandidate]:
        firsts = {0: waves.first_sample(component.rank, cavity)} if 0 in numbers else {}
        for chunk in chunks([number for number in numbers if number], options.batch_size):
            items = [box_item(model, setup, cavity, lesion_seed(options.seed, "lmnet", case_index, component.rank,
                                                                0, number)) for number in chunk]
            firsts.update(zip(chunk, sample(items)))
        return [mask_candidate(model, setup, cavity, blocked, firsts[number], number, case_index, options, sample)
                for number in numbers]

    def judge_mask(candidate: MaskCandidate) -> Agreement:
        if candidate.choice.voxels == 0:
            return EMPTY_MASK
        lesion = paste_crop(np.zeros(occupied.shape, dtype=bool), candidate.choice.mask, component.window)
        return judge("lmnet", judged, judged.ct, lesion, occupied | lesion)

    selection = select(draw, judge_mask if judge is not None else None, lambda candidate: candidate.seed,
                       options.candidates, options.resample_failed)
    best, attempts = selection.kept.choice, selection.kept.attempts
    if best.voxels == 0:
        raise DataError(f"box {component.rank}: LMNet produced no lesion voxel inside the box in {attempts} "
                        "attempt(s); try another inference.seed or more inference.attempts")
    lesion = paste_crop(np.zeros(occupied.shape, dtype=bool), best.mask, component.window)
    record = LesionResult(rank=component.rank, seed=selection.kept.seed, voxels=int(best.voxels),
                          organ=organ_name(setup.key), threshold=best.threshold,
                          target_voxels=round(best.target_voxels, 1), attempts=attempts,
                          seconds=round(time.perf_counter() - start, 3))
    return lesion, record_selection(record, selection)


def lmnet_waves(model: MaskDiffusion, inputs: MaskInputs, components: Sequence[Component], occupied: np.ndarray,
                case_index: int, options: InferenceOptions,
                sample: Callable[[Sequence[ItemInputs]], list]) -> tuple[BoxWaves, Callable[[int], BoxSetup]]:
    """The :class:`BoxWaves` of a case's boxes (``occupied``: the case's lesions so far, updated by the caller)
    and the function giving each box's :class:`BoxSetup` (made once per box)."""
    setups: dict[int, BoxSetup] = {}

    def setup(rank: int) -> BoxSetup:
        if rank not in setups:
            setups[rank] = box_setup(model, inputs, components[rank])
        return setups[rank]

    def independent(earlier: int, later: int) -> bool:
        # An earlier lesion lies in its box; the cavity rule of a later box reads only its one-voxel shell.
        return not slices_meet(components[later].bbox, components[earlier].bbox, (1, 1, 1))

    def prepare(rank: int, cavity: str) -> ItemInputs:
        return box_item(model, setup(rank), cavity, lesion_seed(options.seed, "lmnet", case_index, rank))

    return BoxWaves(len(components), options.batch_size, independent,
                    lambda rank: box_cavity(setup(rank), inputs, occupied), prepare, sample), setup


def sample_case(model: MaskDiffusion, case: CaseSpec, options: InferenceOptions,
                precision: torch.dtype | None = None, debug: bool = False, step_progress: bool = False,
                judge: LesionJudge | None = None) -> CaseResult:
    """Sample every box of one case and write ``samples_<k>.nii.gz`` (and a PNG preview); never raises for a
    bad case: the reason is in the returned result. Up to ``options.batch_size`` boxes share a UNet batch where
    that gives the one-by-one result (:mod:`inference.box_batches`); ``judge``: see :mod:`inference.candidates`."""
    result = CaseResult(case.index, case.case_id)
    path = output_path(case.out_dir, "samples", options.overwrite)
    try:
        if options.overwrite:
            # A failed rerun must not leave the previous mask where label_list.txt points.
            path.unlink(missing_ok=True)
        inputs = read_mask_inputs(case, options)
        components = plan_components(inputs.boxes, options.crop_size, options.max_mask_num,
                                     options.min_component_voxels)
        occupied = np.zeros(inputs.boxes.shape, dtype=bool)
        organs = np.zeros(inputs.boxes.shape, dtype=bool)
        lesions = []
        sample = _sampler(model, options, precision, step_progress)
        waves, setup = lmnet_waves(model, inputs, components, occupied, case.index, options, sample)
        judged = None
        if judge is not None:
            ct, _ = read_volume(case.paths["image"], dtype=np.float32)
            judged = JudgedCase(ct, inputs.seg, inputs.report, inputs.report_path, inputs.geometry)
        for component in components:
            box = setup(component.rank)
            lesion, record = sample_box(model, inputs, box, occupied, case.index, options, waves, sample, judge,
                                        judged)
            if record.voxels < options.min_fill * record.target_voxels:
                result.warnings.append(f"box {record.rank}: the mask fills {record.voxels / record.target_voxels:.0%} "
                                       f"of its target volume after {record.attempts} attempt(s)")
            occupied |= lesion
            organs |= organ_mask(inputs.seg, inputs.report, box.key)
            lesions.append(lesion)
            result.lesions.append(record)
        volume = np.where(occupied, LESION_VALUE, np.where(organs, ORGAN_VALUE, 0)).astype(np.uint8)
        result.outputs["mask"] = str(write_volume(path, volume, inputs.geometry, dtype=np.uint8))
        if options.preview:
            ct, _ = read_volume(case.paths["image"])
            preview = write_lesion_preview(path.with_name(path.name.replace(".nii.gz", ".png")), {"CT": ct},
                                           lesions, inputs.geometry.spacing_zyx, title=f"{case.case_id}: LMNet masks")
            result.outputs["preview"] = str(preview)
        result.status = "done"
    except Exception as error:  # noqa: BLE001 - one bad case must not stop the others; the reason is reported
        result.fail(error, debug)
    return result


def sample_masks(model: MaskDiffusion, cases: Sequence[CaseSpec], options: InferenceOptions,
                 debug: bool = False, position: int = 0, step_progress: bool = False,
                 on_result: Callable[[CaseResult], None] | None = None,
                 judge: LesionJudge | None = None) -> list[CaseResult]:
    """Run LMNet on ``cases`` (in order) with ``model`` (eval mode, on its device); returns one result per case.

    ``position``: line of the per-case progress bar; ``step_progress``: also a bar over the sampling steps;
    ``on_result``: called as each case finishes; with ``options.batch_size`` > 1 cases share UNet batches
    (:mod:`inference.batching`); ``judge`` judges the samples of best of K and resampling (needed when the
    options ask for them, :mod:`inference.candidates`)."""
    check_mask_model(model, options)
    require_judge(options, judge)
    precision = autocast_dtype(model.device, options.precision)
    return run_cases(lambda unet, case: sample_case(unet, case, options, precision, debug, step_progress, judge),
                     model, cases, options, "LMNet", position, on_result)


def label_list_entries(results: Sequence[CaseResult], cases: Sequence[CaseSpec],
                       options: InferenceOptions) -> list[Path]:
    """One ``label_list.txt`` row per case: the mask just written, or for a failed case the name its mask would
    have had (absent, so LINet reports that case as failed instead of using an older mask)."""
    by_index = {result.index: result for result in results}
    rows = []
    for case in cases:
        result = by_index.get(case.index)
        if result is not None and result.ok:
            rows.append(Path(result.outputs["mask"]))
        else:
            rows.append(output_path(case.out_dir, "samples", options.overwrite))
    return rows
