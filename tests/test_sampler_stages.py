"""Every sampler through both stages: ``test.py`` on the demo configs (random weights of the demo architectures,
tiny crops), guidance and the model-level batching with one generator per item."""
import pytest
import torch
from test_bench_gpu import config_with_checkpoint
from test_inference_fixtures import model_block, phantom_dataset, phantom_experiment, randomise

from ldm.data.volume import read_label
from ldm.models.diffusion.samplers import SAMPLERS, SamplerSettings
from ldm.util import instantiate_from_config, make_generator
from inference.cli import main

NAMES = tuple(SAMPLERS)
TINY = ["inference.crop_size=[16,32,32]", "inference.attempts=1", "inference.min_fill=0.0"]


@pytest.fixture(scope="module")
def demo_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler_stages")
    configs = {stage: config_with_checkpoint(stage, root) for stage in ("lmnet", "linet")}
    return root, configs, phantom_dataset(root / "phantoms")


@pytest.mark.parametrize("name", NAMES)
def test_test_py_runs_both_demo_stages_with_every_sampler(demo_setup, name, capsys):
    root, configs, phantoms = demo_setup
    exp_dir = phantom_experiment(root / f"exp_{name}", phantoms, cases=1)
    for stage in ("lmnet", "linet"):
        argv = ["--base", str(configs[stage]), "--exp", str(exp_dir), "--sampler", name, "--steps", "3",
                "--no-preview", "--no-progress", *TINY]
        assert main(argv) == 0, capsys.readouterr().err
    case = next(path for path in exp_dir.iterdir() if (path / "inpainting_0.nii.gz").is_file())
    assert (read_label(case / "inpainting_0_label.nii.gz")[0] == 2).any()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("stage", ["lmnet", "linet"])
def test_batched_equals_one_by_one_and_guidance_counts_with_every_sampler(stage, name):
    torch.manual_seed(0)
    model = instantiate_from_config(model_block(stage))
    randomise(model)
    model.eval()
    context = model.encode_context([{"shape": "round-like,"}, {"shape": "irregular,"}])
    if stage == "lmnet":
        inputs = [(torch.rand(2, 3, 8, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5).float()]
        extra = {}
    else:
        mask = torch.zeros(2, 1, 8, 8, 8)
        mask[:, :, 2:6, 2:6, 2:6] = 1
        inputs, extra = [torch.randn(2, 4, 8, 8, 8, generator=torch.Generator().manual_seed(1)), mask], \
            {"blend": "renoise"}
    sampling = SamplerSettings(name, steps=4)
    draw = lambda rows, scale, seeds: model.sample(*[tensor[rows] for tensor in inputs], context[rows], sampling,
                                                   generator=[make_generator(seed) for seed in seeds]
                                                   if len(seeds) > 1 else make_generator(seeds[0]),
                                                   guidance_scale=scale, **extra)
    batched = draw(slice(0, 2), 2.0, (11, 12))
    for row, seed in enumerate((11, 12)):
        torch.testing.assert_close(batched[row:row + 1], draw(slice(row, row + 1), 2.0, (seed,)),
                                   rtol=1e-3, atol=1e-3)  # fp32 rounding of batched convolutions, which the
        # untrained model amplifies (exact per-item equality with a closed-form denoiser: tests/test_samplers.py)
    assert not torch.allclose(draw(slice(0, 1), 1.0, (11,)), batched[:1], atol=1e-3)   # guidance 2 changes it
