"""LINet inference: every lesion of LMNet's mask inpainted into the original CT, ``<case>/inpainting_<k>.nii.gz``.

Per lesion (the components of value 2 of the case's ``label_list.txt`` mask, largest first):

1. a crop of ``crop_size`` (release 128^3) centred on the lesion, taken from the CT as inpainted so far (padded
   with air where the volume is smaller), mapped to [0, 1] and VQ-encoded (the crop only; the original encoded
   and decoded the whole CT);
2. the latent mask covers every latent voxel touching the lesion (max-pooling; training used nearest
   downsampling, which can miss thin parts; ``latent_mask: nearest`` uses that); DDIM in the latent keeps the
   clean latent outside the mask and is guided by the report's LINet attributes (the UNet's ``skip_context`` must be false for the text to count);
3. the crop is decoded (tiled for large crops), mapped to HU and pasted into the CT by :mod:`inference.paste`:
   beyond a rim of ``rim_mm`` around the lesion every voxel is the input's. Lesions whose crops no earlier
   lesion's paste reaches share a UNet batch, with the one-by-one result (:mod:`inference.box_batches`). With
   ``candidates`` / ``resample_failed`` a lesion is drawn several times and the best-agreeing one is pasted
   (:mod:`inference.candidates`).

Outputs, in the case folder (``k`` the first unused number, see :mod:`inference.cases`):

- ``inpainting_<k>.nii.gz``: the CT **on the grid of the CT the user gave** (for a ``preprocess.py`` folder the
  source CT it recorded, else the listed CT itself): same shape, affine, data type, scaling and orientation codes;
  every voxel farther than the rim from the lesion bit-identical to that file (:mod:`inference.source_grid`);
- ``inpainting_<k>_label.nii.gz``: 0 background, 1 organ, 2 lesion, uint8, on the same grid;
- ``inpainting_<k>_std.nii.gz``: the CT with the lesions on the standardised grid the models ran on (written when
  ``preprocess.py`` made that grid and recorded the source CT), the file the quality gate measures, paired with
  ``samples_<k>.nii.gz``;
- ``inpainting_<k>.png``: three planes through each lesion on the user's grid, input and inpainted.

Use from Python: ``inpaint_cases(model, read_cases(exp_dir, options.lists), options)``.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ldm.data.attributes import linet_attributes, report_attributes, select_organ_key
from ldm.data.cases import load_case
from ldm.data.crops import take_crop
from ldm.data.intensity import AIR_HU, hu_to_unit, unit_to_hu
from ldm.data.organs import organ_name
from ldm.data.volume import Geometry, read_volume, write_volume
from ldm.errors import ConfigError, DataError
from ldm.models.diffusion.inpainting import InpaintingDiffusion, nearest_latent_mask
from inference.batching import run_cases
from inference.box_batches import BoxWaves, ItemInputs, sample_items, slices_meet
from inference.candidates import Agreement, JudgedCase, LesionJudge, chunks, record_selection, require_judge, select
from inference.cases import LMNET_HINT, CaseSpec, output_path, recorded_source
from inference.common import case_grid, check_crop, unet_factor
from inference.devices import autocast, autocast_dtype
from inference.options import InferenceOptions
from inference.paste import output_dtype, paste_generated, rim_voxels, working_dtype
from inference.plan import Component, lesion_seed, plan_components
from inference.previews import write_lesion_preview
from inference.results import CaseResult, LesionResult
from inference.source_grid import LESION_VALUE, ORGAN_VALUE, nearest_on_source_grid, write_on_source_grid


@dataclass
class ImageInputs:
    """One case in memory: the CT (HU, as read), the lesion label, segmentation, report and the CT grid."""

    ct: np.ndarray
    label: np.ndarray
    seg: np.ndarray | None
    report: dict
    geometry: Geometry
    report_path: str


def read_image_inputs(case: CaseSpec, options: InferenceOptions) -> ImageInputs:
    """Read and check one case (DataError naming the file otherwise)."""
    label_path = case.paths["label"]
    if not Path(label_path).is_file():
        raise DataError(f"{label_path}: lesion mask not found; {LMNET_HINT}")
    paths = {"image": case.paths["image"], "label": label_path, "type": case.paths["type"]}
    if case.paths.get("seg"):
        paths["seg"] = case.paths["seg"]
    loaded = load_case(paths, need_image=False, seg_version=options.seg_version)
    geometry = case_grid(paths["image"], label_path, loaded.label.shape)
    ct, _ = read_volume(paths["image"], dtype=working_dtype(geometry))
    return ImageInputs(ct, loaded.label, loaded.seg, loaded.report, geometry, paths["type"])


def vq_factor(model: InpaintingDiffusion) -> int:
    """Image voxels per latent voxel along each axis."""
    return int(model.first_stage_model.downsample_factor)


def check_inpainting_model(model: torch.nn.Module, options: InferenceOptions) -> None:
    """ConfigError unless ``model`` is a LINet whose VQ and UNet accept ``options.crop_size``; warns when the
    UNet is configured to ignore the text."""
    if not isinstance(model, InpaintingDiffusion):
        raise ConfigError(f"the LINet stage needs an InpaintingDiffusion model, got {type(model).__name__}")
    check_crop(options.crop_size, vq_factor(model) * unet_factor(model),
               "the VQ and then the LINet UNet halve each axis that often")
    if getattr(model.model, "skip_context", False):
        warnings.warn("model.params.unet_config.params.skip_context is true: LINet ignores the report's attributes "
                      "(as the original release did); set it to false", stacklevel=2)


def _use_tiles(options: InferenceOptions, latent_shape: Sequence[int]) -> bool:
    return options.vq_tiling == "always" or (options.vq_tiling == "auto" and max(latent_shape) > options.vq_tile)


def encode_crop(model: InpaintingDiffusion, image: torch.Tensor, options: InferenceOptions) -> torch.Tensor:
    """Latent ``[1, C, *crop / f]`` (on the UNet's device) of an image crop in [0, 1] ``[1, 1, *crop]``; the VQ
    runs on its own device, tiled when the latent is larger than ``vq_tile``."""
    vq, factor = model.first_stage_model, vq_factor(model)
    image = image.to(vq.device)
    if _use_tiles(options, [size // factor for size in image.shape[2:]]):
        latent = vq.encode_tiled(image, tile=options.vq_tile * factor, overlap=options.vq_tile_overlap * factor)
    else:
        latent = vq.encode(image)
    return (latent * model.scale_factor).to(model.device)


def decode_crop(model: InpaintingDiffusion, latent: torch.Tensor, crop_size: Sequence[int],
                options: InferenceOptions) -> np.ndarray:
    """The image crop in [0, 1] (float32 numpy, ``crop_size``) decoded from ``latent`` on the VQ's device."""
    vq = model.first_stage_model
    latent = (latent / model.scale_factor).to(device=vq.device, dtype=torch.float32)
    if _use_tiles(options, latent.shape[2:]):
        image = vq.decode_tiled(latent, tile=options.vq_tile, overlap=options.vq_tile_overlap, output_shape=crop_size)
    else:
        image = vq.decode(latent, output_shape=crop_size)
    return image[0, 0].float().cpu().numpy()


def latent_mask(lesion: np.ndarray, factor: int, device: torch.device, mode: str = "max_pool",
                dilation: int = 0) -> torch.Tensor:
    """``[1, 1, *ceil(crop / f)]`` float mask: with ``max_pool`` 1 on every latent voxel whose image cell holds a
    lesion voxel; with ``nearest`` the training's nearest-neighbour downsampling (:func:`nearest_latent_mask`);
    then grown by ``dilation`` latent voxels (the model's ``latent_mask_dilation``: it was trained to inpaint that
    much more)."""
    lesion = torch.from_numpy(np.ascontiguousarray(lesion, dtype=np.float32))[None, None]
    if mode == "nearest":
        mask = nearest_latent_mask(lesion, [-(-size // factor) for size in lesion.shape[2:]])
    else:
        mask = F.max_pool3d(lesion, kernel_size=factor, stride=factor, ceil_mode=True)
    if dilation:
        mask = F.max_pool3d(mask, 2 * dilation + 1, stride=1, padding=dilation)
    return mask.to(device)


@dataclass
class LesionSetup:
    """What one lesion's inpainting takes that no other lesion changes: its crop of the mask, text and context."""

    component: Component
    lesion: np.ndarray
    key: str
    text: dict
    context: torch.Tensor | None


def lesion_setup(model: InpaintingDiffusion, inputs: ImageInputs, component: Component) -> LesionSetup:
    """The fixed inputs of one lesion (organ key from the segmentation when there is one, report text)."""
    lesion = take_crop(component.mask, component.window, fill=False)
    seg = take_crop(inputs.seg, component.window, fill=0) if inputs.seg is not None else None
    key = select_organ_key(inputs.report, lesion, seg)
    text = linet_attributes(report_attributes(inputs.report, key), key, source=inputs.report_path)
    return LesionSetup(component, lesion, key, text, model.encode_context([text]))


def lesion_item(model: InpaintingDiffusion, setup: LesionSetup, crop: np.ndarray, case_index: int,
                options: InferenceOptions) -> ItemInputs:
    """The UNet call of one lesion: the latent of ``crop`` (HU, the CT as inpainted so far), the latent mask, the
    context and the seed."""
    image = hu_to_unit(crop.astype(np.float32))
    latent = encode_crop(model, torch.from_numpy(image)[None, None], options)
    mask = latent_mask(setup.lesion, vq_factor(model), latent.device, options.latent_mask,
                       getattr(model, "latent_mask_dilation", 0))
    seed = lesion_seed(options.seed, "linet", case_index, setup.component.rank)
    return ItemInputs((latent, mask, setup.context), seed)


@dataclass
class ImageCandidate:
    """One draw of a lesion: its seed and the decoded crop in HU (crop shape)."""

    seed: int
    generated: np.ndarray


@torch.no_grad()
def inpaint_lesion(model: InpaintingDiffusion, inputs: ImageInputs, volume: np.ndarray, setup: LesionSetup,
                   waves: BoxWaves, case_index: int, options: InferenceOptions,
                   unblended: np.ndarray | None = None, judge: LesionJudge | None = None,
                   judged: JudgedCase | None = None) -> LesionResult:
    """Inpaint one lesion into ``volume`` (HU, modified in place; its turn: every earlier lesion pasted);
    ``unblended`` receives the generated values themselves, see :func:`inference.paste.paste_generated`. Draw 0
    comes from ``waves``; further draws (best of K, resampling: :mod:`inference.candidates`) share the crop's
    latent and are sampled in batches of ``batch_size``; each is pasted, judged by ``judge`` on ``judged`` and
    taken out again, and the kept one is pasted. Returns the lesion record."""
    start = time.perf_counter()
    component = setup.component
    crop = take_crop(volume, component.window, fill=AIR_HU)
    spacing = inputs.geometry.spacing_zyx

    def seed(number: int) -> int:
        return lesion_seed(options.seed, "linet", case_index, component.rank, 0, number)

    def draw(numbers: list[int]) -> list[ImageCandidate]:
        latents = {0: waves.first_sample(component.rank, crop)} if 0 in numbers else {}
        fresh = [number for number in numbers if number]
        if fresh:
            tensors = lesion_item(model, setup, crop, case_index, options).tensors
            for chunk in chunks(fresh, options.batch_size):
                latents.update(zip(chunk, waves.sample([ItemInputs(tensors, seed(number)) for number in chunk])))
        return [ImageCandidate(seed(number), unit_to_hu(decode_crop(model, latents[number], options.crop_size,
                                                                    options))) for number in numbers]

    lesions = None if judge is None else inputs.label == LESION_VALUE  # as the gate reads the mask

    def judge_image(candidate: ImageCandidate) -> Agreement:
        region = component.window.volume_slices()
        before = volume[region].copy()
        paste_generated(volume, candidate.generated, setup.lesion, component.window, options.rim_mm, spacing,
                        options.match_surroundings)
        try:
            return judge("linet", judged, volume, component.mask, lesions)
        finally:
            volume[region] = before

    selection = select(draw, judge_image if judge is not None else None, lambda candidate: candidate.seed,
                       options.candidates, options.resample_failed)
    offset = paste_generated(volume, selection.kept.generated, setup.lesion, component.window, options.rim_mm,
                             spacing, options.match_surroundings, unblended)
    text = setup.text
    requested = float(text["CT value"].split()[0]) if "CT value" in text else None
    record = LesionResult(rank=component.rank, seed=selection.kept.seed, voxels=component.voxels,
                          organ=organ_name(setup.key), hu_offset=round(offset, 2),
                          mean_hu=round(float(volume[component.mask].mean()), 1), requested_hu=requested,
                          seconds=round(time.perf_counter() - start, 3))
    return record_selection(record, selection)


def linet_waves(model: InpaintingDiffusion, inputs: ImageInputs, components: Sequence[Component],
                volume: np.ndarray, case_index: int, options: InferenceOptions, precision: torch.dtype | None,
                step_progress: bool) -> tuple[BoxWaves, Callable[[int], LesionSetup]]:
    """The :class:`BoxWaves` of a case's lesions (``volume``: the CT as inpainted so far, updated by the caller)
    and the function giving each lesion's :class:`LesionSetup` (made once per lesion)."""
    setups: dict[int, LesionSetup] = {}
    reach = rim_voxels(options.rim_mm, inputs.geometry.spacing_zyx)

    def setup(rank: int) -> LesionSetup:
        if rank not in setups:
            setups[rank] = lesion_setup(model, inputs, components[rank])
        return setups[rank]

    def independent(earlier: int, later: int) -> bool:
        # A paste changes only the lesion and the rim around it; a later lesion reads its whole crop.
        return not slices_meet(components[earlier].bbox, components[later].window.volume_slices(), reach)

    def crop(rank: int) -> np.ndarray:
        return take_crop(volume, components[rank].window, fill=AIR_HU)

    def sample(items: Sequence[ItemInputs]) -> list[torch.Tensor]:
        with autocast(model.device, precision):
            return sample_items(model, items, sampling=options.sampling, guidance_scale=options.guidance_scale,
                                blend=options.blend, use_ema=options.use_ema, progress=step_progress)

    return BoxWaves(len(components), options.batch_size, independent, crop,
                    lambda rank, image: lesion_item(model, setup(rank), image, case_index, options), sample), setup


def hu_warning(record: LesionResult, tolerance: float) -> str | None:
    """A warning when the lesion's mean HU is more than ``tolerance`` from the report's CT value (MAISI-style
    sanity check: a large gap means the text did not take effect or the weights do not fit), else None."""
    if record.requested_hu is None or tolerance <= 0 or abs(record.mean_hu - record.requested_hu) <= tolerance:
        return None
    return (f"lesion {record.rank}: mean {record.mean_hu:.0f} HU, the report asks for {record.requested_hu:.0f} HU "
            f"(more than {tolerance:.0f} HU apart)")


def _lesions_on_source_grid(components: Sequence[Component], geometry: Geometry, source: Geometry) -> list[np.ndarray]:
    """Each inpainted lesion (rank order) as a boolean ``(z, y, x)`` mask on the source grid; lesions that vanish
    there (smaller than its voxels) are left out."""
    ranks = np.zeros(geometry.shape_zyx, dtype=np.int16)
    for component in components:
        ranks[component.mask] = component.rank + 1
    on_source = source.to_memory(nearest_on_source_grid(ranks, geometry, source.affine, source.shape))
    return [mask for component in components if (mask := on_source == component.rank + 1).any()]


def write_outputs(case: CaseSpec, inputs: ImageInputs, volume: np.ndarray, unblended: np.ndarray,
                  components: Sequence[Component], options: InferenceOptions, result: CaseResult) -> None:
    """Write the outputs listed in the module docstring for one inpainted case into ``result.outputs``."""
    path = output_path(case.out_dir, "inpainting", options.overwrite)
    stem = path.name[: -len(".nii.gz")]
    inpainted = np.zeros(volume.shape, dtype=bool)
    for component in components:
        inpainted |= component.mask
    label = np.where(inpainted, LESION_VALUE, np.where(inputs.label > 0, ORGAN_VALUE, 0)).astype(np.uint8)
    source = recorded_source(inputs.geometry.source)
    if source is not None:
        standardised = path.with_name(f"{stem}_std.nii.gz")
        result.outputs["standardised"] = str(write_volume(standardised, volume, inputs.geometry,
                                                          dtype=output_dtype(inputs.geometry, inputs.ct)))
    written = write_on_source_grid(source or inputs.geometry.source, inputs.geometry, unblended, label,
                                   options.rim_mm, path, path.with_name(f"{stem}_label.nii.gz"))
    result.outputs["image"], result.outputs["label"] = str(written.image), str(written.label)
    result.outputs.setdefault("standardised", str(written.image))
    if written.lesion_voxels == 0:
        result.warnings.append("no lesion voxel left on the input grid (the lesions are smaller than its voxels); "
                               "the output equals the input")
    if not options.preview:
        return
    if written.lesion_voxels:
        before, grid = read_volume(source or inputs.geometry.source)
        after, _ = read_volume(written.image)
        masks = _lesions_on_source_grid(components, inputs.geometry, grid)
    else:
        before, after, grid, masks = inputs.ct, volume, inputs.geometry, [c.mask for c in components]
    result.outputs["preview"] = str(write_lesion_preview(
        path.with_name(f"{stem}.png"), {"input": before, "inpainted": after}, masks, grid.spacing_zyx,
        title=f"{case.case_id}: LINet, input grid, rim {options.rim_mm:g} mm"))


def inpaint_case(model: InpaintingDiffusion, case: CaseSpec, options: InferenceOptions,
                 precision: torch.dtype | None = None, debug: bool = False, step_progress: bool = False,
                 judge: LesionJudge | None = None) -> CaseResult:
    """Inpaint every lesion of one case and write the outputs of the module docstring; never raises for a bad
    case: the reason is in the returned result. ``judge``: see :mod:`inference.candidates`."""
    result = CaseResult(case.index, case.case_id)
    try:
        inputs = read_image_inputs(case, options)
        margin = rim_voxels(options.rim_mm, inputs.geometry.spacing_zyx)
        components = plan_components(inputs.label, options.crop_size, options.max_mask_num,
                                     options.min_component_voxels, margin=margin)
        volume = inputs.ct.copy()
        unblended = inputs.ct.copy()
        waves, setup = linet_waves(model, inputs, components, volume, case.index, options, precision, step_progress)
        judged = None if judge is None else JudgedCase(inputs.ct, inputs.seg, inputs.report, inputs.report_path,
                                                       inputs.geometry)
        for component in components:
            record = inpaint_lesion(model, inputs, volume, setup(component.rank), waves, case.index, options,
                                    unblended, judge, judged)
            result.lesions.append(record)
            warning = hu_warning(record, options.hu_tolerance)
            if warning:
                result.warnings.append(warning)
        write_outputs(case, inputs, volume, unblended, components, options, result)
        result.status = "done"
    except Exception as error:  # noqa: BLE001 - one bad case must not stop the others; the reason is reported
        result.fail(error, debug)
    return result


def inpaint_cases(model: InpaintingDiffusion, cases: Sequence[CaseSpec], options: InferenceOptions,
                  debug: bool = False, position: int = 0, step_progress: bool = False,
                  on_result: Callable[[CaseResult], None] | None = None,
                  judge: LesionJudge | None = None) -> list[CaseResult]:
    """Run LINet on ``cases`` (in order) with ``model`` (eval mode; VQ on its own device); one result per case.

    ``position``: line of the per-case progress bar; ``step_progress``: also a bar over the sampling steps;
    ``on_result``: called as each case finishes; with ``options.batch_size`` > 1 cases share UNet batches
    (:mod:`inference.batching`); ``judge`` judges the samples of best of K and resampling (needed when the
    options ask for them, :mod:`inference.candidates`)."""
    check_inpainting_model(model, options)
    require_judge(options, judge)
    precision = autocast_dtype(model.device, options.precision)
    return run_cases(lambda unet, case: inpaint_case(unet, case, options, precision, debug, step_progress, judge),
                     model, cases, options, "LINet", position, on_result)
