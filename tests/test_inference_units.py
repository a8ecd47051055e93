"""Inference building blocks without models: options, case folders, components and crops, seeds, threshold
choice, paste-back, output dtype, device placement."""
import math
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from ldm.data.crops import plan_crop, take_crop
from ldm.data.volume import Geometry
from ldm.errors import ConfigError, DataError
from ldm.models.diffusion.samplers import SamplerSettings
from inference.cases import case_folders, output_path, write_list
from inference.linet import hu_warning
from inference.devices import Placement, autocast_dtype, neighbour_gpus, plan_placements
from ldm.cli import parse_gpus
from inference.options import DEFAULT_THRESHOLDS, parse_options
from inference.paste import blend_weights, lesion_region, output_dtype, paste_generated
from inference.plan import lesion_seed, plan_components, select_components
from inference.results import CaseResult, LesionResult, summary_lines
from inference.thresholds import blocked_region, choose_threshold, target_volume


# ------------------------------------------------------------------------------------------------ options
def test_options_defaults_per_stage_and_overrides():
    lmnet = parse_options({"steps": 4, "exp_dir": "experiments/x"}, "lmnet")
    assert lmnet.crop_size == (64, 152, 152) and lmnet.steps == 4 and lmnet.lists["boxes"] == "bbox_list.txt"
    assert lmnet.thresholds == DEFAULT_THRESHOLDS and lmnet.thresholds[0] == 0.9 and lmnet.thresholds[-1] == 0.3
    linet = parse_options({"crop_size": 32, "lists": {"label": "masks.txt"}}, "linet")
    assert linet.crop_size == (32, 32, 32) and linet.lists["label"] == "masks.txt"
    assert linet.lists["image"] == "img_list.txt"
    assert linet.with_overrides(seed=5, eta=None).seed == 5 and linet.with_overrides(eta=None).eta == 1.0


@pytest.mark.parametrize("block, message", [
    ({"ddim_step": 3}, "unknown setting"),
    ({"sampler": "euler"}, "inference.sampler"),
    ({"vq_device": "next"}, "inference.vq_device"),
    ({"crop_size": [8, 16]}, "inference.crop_size"),
    ({"thresholds": [0.5, 1.2]}, "inference.thresholds"),
    ({"seed": -1}, "inference.seed"),
    ({"steps": 2.5}, "inference.steps: must be an integer"),
    ({"sampler": "dpmpp_2m", "timestep_spacing": "original"}, "inference.timestep_spacing"),
    ({"thresholds": ["high"]}, "inference.thresholds"),
    ({"overwrite": "yes"}, "inference.overwrite: must be true or false"),
    ({"stage": "linet"}, "does not match the model"),
    ({"lists": {"image": "/abs/img.txt"}}, "inference.lists.image"),
])
def test_options_reject_bad_settings_naming_the_key(block, message):
    with pytest.raises(ConfigError, match=message):
        parse_options(block, "lmnet")


# ------------------------------------------------------------------------------------------ case folders
def test_case_folders_inside_and_outside_the_experiment(tmp_path):
    exp = tmp_path / "exp"
    images = [str(exp / "ct_a" / "ct.nii.gz"), str(tmp_path / "data" / "p1" / "ct.nii.gz"),
              str(tmp_path / "other" / "p1" / "ct.nii.gz")]
    folders = case_folders(exp, images)
    assert folders[0] == ("ct_a", (exp / "ct_a").resolve())
    assert folders[1][0] == "p1_001" and folders[2][0] == "p1_002"
    assert folders[1][1] == (exp / "p1_001").resolve()


def test_output_numbering_never_replaces_unless_overwrite(tmp_path):
    assert output_path(tmp_path / "missing", "samples", False).name == "samples_0.nii.gz"
    for name in ("samples_0.nii.gz", "samples_2.nii.gz", "samples_x.nii.gz", "inpainting_1.nii.gz"):
        (tmp_path / name).touch()
    assert output_path(tmp_path, "samples", False).name == "samples_1.nii.gz"
    assert output_path(tmp_path, "samples", True).name == "samples_0.nii.gz"
    assert output_path(tmp_path, "inpainting", False).name == "inpainting_0.nii.gz"


def test_write_list_relative_inside_absolute_outside(tmp_path):
    path = write_list(tmp_path / "exp" / "label_list.txt", [tmp_path / "exp" / "a" / "s.nii.gz", tmp_path / "b.nii.gz"])
    assert path.read_text().splitlines() == ["a/s.nii.gz", str((tmp_path / "b.nii.gz").resolve())]


# --------------------------------------------------------------------------------- components and crops
def test_components_largest_first_min_size_and_count():
    label = np.zeros((20, 20, 20), dtype=np.int16)
    label[1:3, 1:3, 1:3] = 2          # 8 voxels
    label[5:10, 5:10, 5:10] = 2       # 125
    label[12:16, 12:16, 12:16] = 2    # 64
    label[0, 19, 19] = 1              # organ voxels are ignored
    sizes = [int(mask.sum()) for mask in select_components(label, max_count=3, min_voxels=50)]
    assert sizes == [125, 64]
    assert [int(m.sum()) for m in select_components(label, max_count=1, min_voxels=50)] == [125]
    assert [int(m.sum()) for m in select_components(label, max_count=3, min_voxels=500)] == [125]
    with pytest.raises(DataError, match="no lesion voxel"):
        select_components(np.ones((4, 4, 4)), 3, 0)


def test_plan_pads_volumes_smaller_than_the_crop_and_rejects_lesions_too_large():
    label = np.zeros((10, 40, 40), dtype=np.int16)
    label[3:7, 30:36, 2:6] = 2
    (component,) = plan_components(label, (16, 16, 16), 3, 0, margin=2)
    window = component.window
    assert window.pad_before == (3, 0, 0) and window.crop_start[0] == 0
    assert window.crop_start[1] == 40 - 16 and window.crop_start[2] == 0
    assert component.extent == (4, 6, 4) and component.voxels == 96
    with pytest.raises(DataError, match="more than the crop"):
        plan_components(label, (16, 16, 16), 3, 0, margin=6)


def test_seeds_are_deterministic_and_distinct():
    assert lesion_seed(23, "lmnet", 0, 0) == lesion_seed(23, "lmnet", 0, 0)
    seeds = {lesion_seed(23, stage, case, lesion, attempt) for stage in ("lmnet", "linet") for case in range(3)
             for lesion in range(2) for attempt in range(2)}
    assert len(seeds) == 24 and all(0 <= seed < 2**63 for seed in seeds)
    assert lesion_seed(24, "lmnet", 0, 0) != lesion_seed(23, "lmnet", 0, 0)


# -------------------------------------------------------------------------------------------- thresholds
def ellipsoid(shape, centre, semi_axes):
    grid = np.indices(shape).astype(float)
    return sum(((g - c) / s) ** 2 for g, c, s in zip(grid, centre, semi_axes)) <= 1


def test_threshold_matches_the_inscribed_ellipsoid_not_the_box():
    shape, box = (20, 20, 20), np.zeros((20, 20, 20), dtype=bool)
    box[2:18, 2:18, 2:18] = True
    distance = np.sqrt(((np.indices(shape) - 9.5) ** 2).sum(axis=0))
    sample = np.clip(1.0 - distance / 14.0, 0, 1)      # a soft ball: lower thresholds give larger balls
    blocked = np.zeros(shape, dtype=bool)
    chosen = choose_threshold(sample, box, blocked, DEFAULT_THRESHOLDS, "ellipsoid")
    original = choose_threshold(sample, box, blocked, DEFAULT_THRESHOLDS, "box")
    assert chosen.target_voxels == pytest.approx(math.pi / 6 * 16**3)
    errors = {t: abs(int(((sample > t) & box).sum()) - chosen.target_voxels) for t in DEFAULT_THRESHOLDS}
    assert chosen.threshold == min(errors, key=lambda t: (errors[t], -t))
    assert chosen.threshold > original.threshold and original.voxels > chosen.voxels
    assert not (chosen.mask & ~box).any()


def test_threshold_keeps_the_largest_component_away_from_other_lesions():
    sample = np.zeros((12, 12, 12))
    sample[2:5, 2:5, 2:5] = 0.95
    sample[6:11, 6:11, 6:11] = 0.95
    box = np.ones(sample.shape, dtype=bool)
    taken = np.zeros(sample.shape, dtype=bool)
    taken[5, 5, 5] = True
    blocked = blocked_region(taken)
    chosen = choose_threshold(sample, box, blocked, [0.5], "box")
    assert chosen.voxels == 125 - 1 and not chosen.mask[6, 6, 6]   # the corner touching the taken voxel is removed
    assert choose_threshold(np.zeros((4, 4, 4)), np.ones((4, 4, 4), bool), np.zeros((4, 4, 4), bool), [0.5]).voxels == 0
    assert target_volume(10, "box") == 10.0


def test_fill_holes_fills_enclosed_cavities():
    sample = ellipsoid((15, 15, 15), (7, 7, 7), (6, 6, 6)).astype(float)
    sample[6:9, 6:9, 6:9] = 0.0
    box = np.ones(sample.shape, dtype=bool)
    blocked = np.zeros(sample.shape, dtype=bool)
    assert choose_threshold(sample, box, blocked, [0.5], fill_holes=True).mask[7, 7, 7]
    assert not choose_threshold(sample, box, blocked, [0.5], fill_holes=False).mask[7, 7, 7]


# ------------------------------------------------------------------------------------------------- paste
def test_blend_weights_fade_over_the_rim_in_mm_at_any_spacing():
    lesion = np.zeros((1, 1, 15), dtype=bool)
    lesion[0, 0, 7] = True
    weights = blend_weights(lesion, rim_mm=2.0, spacing=(1.0, 1.0, 0.5))[0, 0]
    expected = [0.5 * (1 + math.cos(math.pi * d / 2.0)) for d in (0.5, 1.0, 1.5)]
    assert weights[7] == 1.0
    np.testing.assert_allclose(weights[8:11], expected, rtol=1e-6)
    np.testing.assert_allclose(weights[4:7], expected[::-1], rtol=1e-6)
    assert not weights[11:].any() and not weights[:4].any()        # 2 mm and farther: untouched
    coarse = blend_weights(lesion, rim_mm=2.0, spacing=(3.0, 3.0, 3.0))[0, 0]
    assert list(np.flatnonzero(coarse)) == [7]                      # 3 mm voxels: only the lesion changes
    assert lesion_region(lesion, 0.0, (1, 1, 1)).sum() == 1
    assert not blend_weights(np.zeros((3, 3, 3), bool), 1.0, (1, 1, 1)).any()


def test_paste_changes_only_the_lesion_region_and_matches_the_surroundings():
    rng = np.random.default_rng(0)
    volume = rng.normal(40, 300, size=(12, 20, 20)).astype(np.float32)
    original = volume.copy()
    lesion_full = np.zeros(volume.shape, dtype=bool)
    lesion_full[5:7, 8:11, 9:12] = True
    window = plan_crop(volume.shape, (16, 16, 16), (6, 9, 10))
    lesion = take_crop(lesion_full, window, fill=False)
    generated = take_crop(original, window, fill=-1000).astype(np.float64) - 30.0   # a reconstruction 30 HU low
    generated[lesion] = 500.0
    unblended = original.copy()
    offset = paste_generated(volume, generated, lesion, window, 2.0, (2.0, 1.0, 1.0), match_surroundings=True,
                             unblended=unblended)
    region = lesion_region(lesion_full, 2.0, (2.0, 1.0, 1.0))
    assert region.sum() > lesion_full.sum() and not region[4, 9, 10] and region[5, 7, 10]
    assert offset == pytest.approx(30.0)
    assert np.array_equal(volume[~region], original[~region])
    np.testing.assert_allclose(volume[lesion_full], 530.0)
    np.testing.assert_allclose(volume[region & ~lesion_full], original[region & ~lesion_full], atol=1e-3)
    assert np.array_equal(unblended[~region], original[~region])
    np.testing.assert_allclose(unblended[region & ~lesion_full], original[region & ~lesion_full], atol=1e-3)


def geometry(dtype, slope=None, intercept=None):
    image = nib.Nifti1Image(np.zeros((4, 4, 4), dtype=dtype), np.eye(4))
    if slope is not None:
        image.header.set_slope_inter(slope, intercept)
    return Geometry(np.eye(4), (4, 4, 4), image.header)


def test_output_dtype_keeps_the_input_class():
    hu = np.array([-1024.0, 40.0, 1500.0])
    assert output_dtype(geometry(np.int16), hu) == np.int16
    assert output_dtype(geometry(np.float32), hu) == np.float32
    assert output_dtype(geometry(np.float64), hu) == np.float64
    assert output_dtype(geometry(np.uint8), hu) == np.int16
    assert output_dtype(geometry(np.uint16, 1.0, -1024.0), hu) == np.int16
    assert output_dtype(geometry(np.uint16, 0.5, -1024.0), hu + 0.5) == np.float32


# ----------------------------------------------------------------------------------------------- devices
def test_gpu_parsing_and_placements():
    assert parse_gpus("0, 2") == [0, 2] and parse_gpus(None) == []
    for bad in ("a", "0,0"):
        with pytest.raises(ConfigError, match="--gpus"):
            parse_gpus(bad)
    same = plan_placements([0, 2], 4, "same")
    assert same == [Placement(0, 2, "cuda:0", "cuda:0"), Placement(1, 2, "cuda:2", "cuda:2")]
    assert [p.vq_device for p in plan_placements([0, 2], 4, "neighbour")] == ["cuda:1", "cuda:3"]
    assert [p.vq_device for p in plan_placements([1], 2, "neighbour")] == ["cuda:0"]
    assert plan_placements([], 0, "same") == [Placement(0, 1, "cpu", "cpu")]
    assert plan_placements([], 2, "neighbour") == [Placement(0, 1, "cuda:0", "cuda:1")]
    assert plan_placements([], 2, "cpu", device="cuda:1") == [Placement(0, 1, "cuda:1", "cpu")]


def test_neighbour_never_collides_and_fails_clearly():
    assert neighbour_gpus([0, 1], 4) == [2, 3]
    with pytest.raises(ConfigError, match="neighbour needs a free GPU"):
        plan_placements([0, 1], 2, "neighbour")
    with pytest.raises(ConfigError, match="neighbour needs GPUs"):
        plan_placements([], 0, "neighbour")
    with pytest.raises(ConfigError, match="GPU 3 is not visible"):
        plan_placements([3], 2, "same")
    with pytest.raises(ConfigError, match="inference.device"):
        plan_placements([], 0, "same", device="cuda:0")


def test_autocast_only_on_cuda():
    assert autocast_dtype("cuda:0", "bf16") == torch.bfloat16 and autocast_dtype("cuda:1", "fp16") == torch.float16
    assert autocast_dtype("cuda:0", "fp32") is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert autocast_dtype("cpu", "bf16") is None
    assert any("CUDA only" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------------------------- results
def test_hu_sanity_warning_and_summary():
    record = LesionResult(rank=0, seed=1, voxels=10, mean_hu=300.0, requested_hu=57.0)
    assert "mean 300 HU, the report asks for 57 HU" in hu_warning(record, 150.0)
    assert hu_warning(record, 300.0) is None and hu_warning(record, 0.0) is None
    assert hu_warning(LesionResult(rank=0, seed=1, voxels=10, mean_hu=300.0), 150.0) is None
    done = CaseResult(0, "a", "done", {"image": "/x/a/inpainting_0.nii.gz"}, [record], ["lesion 0: far"], seconds=1.25)
    failed = CaseResult(1, "b", error="b.nii.gz: file not found")
    assert summary_lines([done, failed], "linet") == [
        "  a: 1 lesion(s) -> inpainting_0.nii.gz (1.2 s)", "    warning: lesion 0: far",
        "  b: FAILED: b.nii.gz: file not found", "linet: 2 case(s), 1 done, 1 failed"]


def test_sampler_settings_come_as_one_object_and_ddim_steps_still_reads_with_a_warning():
    options = parse_options({"sampler": "dpmpp_2m_sde", "steps": 20, "timestep_spacing": "trailing"}, "lmnet")
    assert options.sampling == SamplerSettings("dpmpp_2m_sde", 20, 1.0, "trailing")
    assert parse_options({"sampler": "unipc"}, "linet").sampling.resolved_spacing == "karras"
    assert parse_options({}, "linet").sampling == SamplerSettings("ddim", 200, 1.0, None)
    with pytest.warns(FutureWarning, match="inference.ddim_steps is deprecated, use inference.steps"):
        old = parse_options({"steps": 50, "ddim_steps": 7}, "lmnet")   # an old override on a new config
    assert old.steps == 7 and old.sampling.steps == 7
