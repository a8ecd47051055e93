"""Batched sampling: per-item generators give each item the noise it gets alone, a batch of lesions sampled together
equals them sampled one by one (fp32 rounding), and cases in flight share UNet batches with the outputs of a
one-by-one run."""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from test_inference_fixtures import (inference_config, model_block, phantom_dataset, phantom_experiment, randomise,
                                     save_checkpoint)

from ldm.data.volume import read_label, read_volume
from ldm.models.diffusion.samplers import SamplerSettings, randn
from ldm.util import instantiate_from_config, make_generator
from inference.batching import BatchingModel, run_cases
from inference.cases import read_cases
from inference.linet import inpaint_case
from inference.lmnet import sample_case
from inference.options import parse_options
from inference.runner import load_model, run_inference

# Batched 3D convolutions add up in another order than batch-1 ones: differences of a few 1e-6 per UNet call.
SAMPLE_TOLERANCE = 1e-4


def test_per_item_generators_draw_what_each_draws_alone():
    batch = randn((3, 2, 4, 5), [make_generator(seed) for seed in (5, 6, 7)], "cpu")
    for row, seed in enumerate((5, 6, 7)):
        torch.testing.assert_close(batch[row:row + 1], randn((1, 2, 4, 5), make_generator(seed), "cpu"),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn((3, 2), [make_generator(1), make_generator(2)], "cpu")


@pytest.mark.parametrize("stage", ["lmnet", "linet"])
def test_batched_sampling_equals_one_by_one(stage):
    torch.manual_seed(0)
    model = instantiate_from_config(model_block(stage))
    randomise(model)
    model.eval()
    context = model.encode_context([{"shape": "round-like,"}, {"shape": "irregular,"}, {"density": "low density,"}])
    seeds = (11, 12, 13)
    settings = dict(sampling=SamplerSettings(steps=3, eta=1.0), guidance_scale=2.0)
    if stage == "lmnet":
        inputs = [(torch.rand(3, 3, 8, 16, 16) > 0.5).float()]
    else:
        mask = torch.zeros(3, 1, 8, 8, 8)
        mask[:, :, 2:6, 2:6, 2:6] = 1
        inputs = [torch.randn(3, 4, 8, 8, 8), mask]
        settings["blend"] = "renoise"  # draws noise for the known region too
    batched = model.sample(*inputs, context, generator=[make_generator(seed) for seed in seeds], **settings)
    for row, seed in enumerate(seeds):
        alone = model.sample(*[tensor[row:row + 1] for tensor in inputs], context[row:row + 1],
                             generator=make_generator(seed), **settings)
        torch.testing.assert_close(batched[row:row + 1], alone, rtol=0, atol=SAMPLE_TOLERANCE)
    assert not torch.allclose(batched[0], batched[1], atol=1e-2)  # items really differ


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    exp_dir = phantom_experiment(root / "exp", phantom_dataset(root / "phantoms"), cases=3)
    checkpoints = {stage: save_checkpoint(stage, root / f"{stage}.ckpt") for stage in ("lmnet", "linet")}
    run_inference(inference_config("lmnet", checkpoints["lmnet"], exp_dir, preview=False))
    return exp_dir, checkpoints


@pytest.mark.parametrize("stage", ["lmnet", "linet"])
def test_cases_in_flight_share_batches_and_match_one_by_one(experiment, stage):
    exp_dir, checkpoints = experiment
    # LINet: the VQ tiled, whose passes patch its GroupNorm layers: the cases in flight must take turns with it.
    tiling = {"vq_tiling": "always", "vq_tile": 4, "vq_tile_overlap": 2} if stage == "linet" else {}
    config = inference_config(stage, checkpoints[stage], exp_dir, preview=False, overwrite=False, **tiling)
    model = load_model(config)
    process_case = sample_case if stage == "lmnet" else inpaint_case
    seen = []

    def process(unet, case):
        seen.append(unet)
        return process_case(unet, case, options)

    outputs = {}
    for batch_size in (1, 3):
        options = parse_options(config.inference, stage).with_overrides(batch_size=batch_size)
        cases = read_cases(exp_dir, dict(options.lists))
        results = run_cases(process, model, cases, options, stage)
        assert [result.index for result in results] == [0, 1, 2] and all(result.ok for result in results)
        outputs[batch_size] = results
    one_by_one, batched = outputs[1], outputs[3]
    assert seen[0] is model and max(seen[-1].batch_sizes) > 1      # batch 1 runs the model itself; 3 batches
    for alone, together in zip(one_by_one, batched):
        assert [lesion.seed for lesion in alone.lesions] == [lesion.seed for lesion in together.lesions]
        key = "mask" if stage == "lmnet" else "image"
        assert alone.outputs[key] != together.outputs[key]          # two files, compared by content
        if stage == "lmnet":
            np.testing.assert_array_equal(read_label(alone.outputs[key])[0], read_label(together.outputs[key])[0])
        else:
            np.testing.assert_allclose(read_volume(alone.outputs[key])[0], read_volume(together.outputs[key])[0],
                                       atol=1.0)  # HU; stored as integers: rounding may move a voxel by 1


def test_a_batch_that_raises_is_retried_item_by_item_and_the_error_lands_on_its_case():
    torch.manual_seed(0)
    model = instantiate_from_config(model_block("lmnet"))
    randomise(model)
    model.eval()
    context = model.encode_context([{"shape": "round-like,"}, {"shape": "irregular,"}, {"density": "low density,"}])
    masks = [(torch.rand(1, 3, 8, 16, 16) > 0.5).float() for _ in range(3)]
    masks[1] = masks[1].to("meta")    # same shape and dtype, so it joins the batch; the batch cannot be assembled
    settings = dict(sampling=SamplerSettings(steps=2, eta=1.0), guidance_scale=1.0)
    batching = BatchingModel(model, batch_size=3)
    everyone_in_flight = threading.Barrier(3)

    def one_case(item: int):
        with batching.case():
            everyone_in_flight.wait()
            return batching.sample(masks[item], context[item:item + 1], generator=make_generator(20 + item),
                                   **settings)

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(one_case, item) for item in range(3)]
    with pytest.raises(Exception) as raised:
        futures[1].result()
    assert "meta" in str(raised.value).lower() or "device" in str(raised.value).lower()
    assert batching.batch_sizes == [1, 1], "the batch of 3 failed; the two good items ran alone"
    for item in (0, 2):
        alone = model.sample(masks[item], context[item:item + 1], generator=make_generator(20 + item), **settings)
        torch.testing.assert_close(futures[item].result(), alone, rtol=0, atol=0)
