"""The boxes of one case share UNet batches (waves) and give what sampling them one by one gives: LMNet masks bit
for bit, LINet images within the batched-convolution rounding; boxes that reach each other (overlapping crops,
a box in another's cavity shell) go to later waves; a box whose basis changed after its wave is sampled again."""
import json

import numpy as np
import pytest
import torch
from test_inference_fixtures import (inference_config, model_block, phantom_dataset, phantom_row, randomise,
                                     save_checkpoint, write_lists)

from ldm.data.volume import read_label, read_volume, write_volume
from ldm.models.diffusion.samplers import SamplerSettings
from ldm.util import instantiate_from_config
from inference.box_batches import BoxWaves, ItemInputs, sample_items, same_basis, slices_meet
from inference.cases import read_cases
from inference.batching import run_cases
from inference.linet import inpaint_case
from inference.lmnet import sample_case
from inference.options import parse_options
from inference.runner import load_model, run_inference

BATCHED = 4
SEVERAL = {"max_mask_num": 6, "min_component_voxels": 1}  # every box, small ones too
# Four boxes of the liver of phantom case_000 (z, y, x), far enough apart to share one wave.
APART = [(slice(17, 20), slice(29, 33), slice(14, 18)), (slice(17, 20), slice(35, 39), slice(24, 28)),
         (slice(26, 29), slice(24, 28), slice(22, 26)), (slice(26, 29), slice(36, 40), slice(13, 17))]
# An L-shaped box and one beside its bounding box: the first lesion may lie in the second box's shell.
L_SHAPE = [(slice(17, 20), slice(30, 38), slice(14, 16)), (slice(17, 20), slice(36, 38), slice(14, 24))]
BESIDE = (slice(17, 20), slice(30, 34), slice(24, 27))


def test_slices_meet_and_same_basis():
    box = (slice(2, 5), slice(2, 5), slice(2, 5))
    assert slices_meet(box, (slice(4, 6), slice(0, 3), slice(4, 9)))
    assert not slices_meet(box, (slice(5, 6), slice(2, 5), slice(2, 5)))
    assert slices_meet(box, (slice(5, 6), slice(2, 5), slice(2, 5)), (1, 0, 0))
    assert same_basis(np.array([1.0, np.nan]), np.array([1.0, np.nan])) and not same_basis(np.zeros(2), np.ones(2))
    assert same_basis("within,", "within,") and not same_basis("within,", "protruding,")


def test_a_wave_sample_is_used_only_for_the_basis_it_was_sampled_with():
    torch.manual_seed(0)
    model = instantiate_from_config(model_block("lmnet"))
    randomise(model)
    model.eval()
    cond = (torch.rand(3, 3, 8, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5).float()

    def prepare(index, shape):
        return ItemInputs((cond[index:index + 1], model.encode_context([{"shape": shape}])), 100 + index)

    def sample(items):
        return sample_items(model, items, sampling=SamplerSettings(steps=3, eta=1.0), guidance_scale=2.0)

    def alone(index, shape):
        return sample([prepare(index, shape)])[0]

    waves = BoxWaves(3, 3, lambda earlier, later: True, lambda index: "round-like,", prepare, sample)
    first = waves.first_sample(0, "round-like,")
    second = waves.first_sample(1, "round-like,")   # sampled in the wave, basis unchanged
    third = waves.first_sample(2, "irregular,")     # sampled in the wave with another basis: sampled again
    assert waves.wave_sizes == [3] and waves.resampled == [2]
    torch.testing.assert_close(first, alone(0, "round-like,"), rtol=0, atol=1e-4)
    torch.testing.assert_close(second, alone(1, "round-like,"), rtol=0, atol=1e-4)
    torch.testing.assert_close(third, alone(2, "irregular,"), rtol=0, atol=0)
    assert not torch.allclose(third, alone(2, "round-like,"), atol=1e-2)

    reaching = BoxWaves(3, 3, lambda earlier, later: later != 2, lambda index: "round-like,", prepare, sample)
    for index in range(3):
        reaching.first_sample(index, "round-like,")
    assert reaching.wave_sizes == [2, 1] and reaching.resampled == []


def box_case(exp_dir, phantoms, name, boxes, report_cavity=True):
    """A list row for phantom case_000 with ``boxes`` (value 2) as its box file; without ``report_cavity`` the
    report's cavity is blank, so LMNet's cavity rule (which sees earlier lesions) decides it."""
    row = phantom_row(exp_dir / name, phantoms, "case_000")
    seg, geometry = read_label(row["seg"])
    volume = np.zeros(seg.shape, dtype=np.uint8)
    for box in boxes:
        volume[box] = 2
    row["bbox"] = write_volume(exp_dir / name / "bbox.nii.gz", volume, geometry, dtype=np.uint8)
    if not report_cavity:
        report = json.loads(row["type"].read_text())
        for entry in report.values():
            entry[2]["cavity"] = ""
        row["type"] = exp_dir / name / "type.json"
        row["type"].write_text(json.dumps(report))
    return row


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("boxes")
    phantoms = phantom_dataset(root / "phantoms")
    exp_dir = root / "exp"
    rows = [box_case(exp_dir, phantoms, "apart", APART),
            box_case(exp_dir, phantoms, "reaching", APART[2:] + L_SHAPE + [BESIDE], report_cavity=False)]
    write_lists(exp_dir, rows)
    checkpoints = {stage: save_checkpoint(stage, root / f"{stage}.ckpt") for stage in ("lmnet", "linet")}
    run_inference(inference_config("lmnet", checkpoints["lmnet"], exp_dir, preview=False, min_fill=0.0, **SEVERAL))
    return exp_dir, checkpoints


@pytest.mark.parametrize("stage", ["lmnet", "linet"])
def test_boxes_of_a_case_batched_equal_one_by_one(experiment, stage):
    exp_dir, checkpoints = experiment
    retries = {"min_fill": 0.9} if stage == "lmnet" else {}  # LMNet: further attempts, sampled alone
    config = inference_config(stage, checkpoints[stage], exp_dir, preview=False, overwrite=False, **SEVERAL,
                              **retries)
    model = load_model(config)
    process_case = sample_case if stage == "lmnet" else inpaint_case
    batch_sizes = {}

    def process(unet, case):
        batch_sizes[case.case_id] = getattr(unet, "batch_sizes", [1])
        return process_case(unet, case, options)

    outputs = {}
    for batch_size in (1, BATCHED):
        options = parse_options(config.inference, stage).with_overrides(batch_size=batch_size)
        # One case in flight at a time: every batch of more than one item holds boxes of one case.
        outputs[batch_size] = [run_cases(process, model, [case], options, stage)[0]
                               for case in read_cases(exp_dir, dict(options.lists))]
    if stage == "lmnet":  # the first wave: every box apart; in the other case all but the box beside the L
        assert [batch_sizes[result.case_id][0] for result in outputs[BATCHED]] == [4, 3]
    for alone, together in zip(outputs[1], outputs[BATCHED]):
        assert alone.ok and together.ok and len(alone.lesions) >= 4, alone.error
        assert max(batch_sizes[together.case_id]) > 1
        fields = ("rank", "seed", "voxels", "organ", "threshold", "attempts")
        assert [[getattr(lesion, name) for name in fields] for lesion in alone.lesions] == \
            [[getattr(lesion, name) for name in fields] for lesion in together.lesions]
        if stage == "lmnet":
            np.testing.assert_array_equal(read_label(alone.outputs["mask"])[0],
                                          read_label(together.outputs["mask"])[0])
        else:
            np.testing.assert_allclose(read_volume(alone.outputs["image"])[0],
                                       read_volume(together.outputs["image"])[0], atol=1.0)
