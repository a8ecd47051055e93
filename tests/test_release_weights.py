"""The released weights work on the first try. A ``weights/`` folder holding only ``LMNet.ckpt``, ``LINet.ckpt``
and ``VQ.ckpt`` - release-size models built from our release configs (random weights; the real files cannot be
downloaded here) and saved as Lightning saves them, ``hyper_parameters`` as OmegaConf objects - runs both stages
of the release test configs on the CPU (2 DDIM steps, small crops) without any other file, ``--info`` names each
file, and LINet fine-tuning starts from ``LINet.ckpt`` alone. The slowest module of the suite (about 1.7 GB of
checkpoints); the other checkpoint tests use demo-size models (test_checkpoints.py)."""
import os

import numpy as np
import pytest
import torch
from checkpoint_fixtures import build_and_save
from test_inference_fixtures import phantom_dataset, phantom_experiment
from test_train_stages import data_overrides

import convert_checkpoint
import main as training
from demo.make_phantoms import make_phantoms
from ldm.data.volume import read_volume
from ldm.models.checkpoint import read_state_dict
from ldm.util import PIPELINE_DIR, load_config
from inference.runner import run_inference

RELEASE_FILES = ["LINet.ckpt", "LMNet.ckpt", "VQ.ckpt"]
STAGES = (("lmnet", "LMNet.ckpt", "maskdiffusion_test.yaml", "[16,32,32]"),
          ("linet", "LINet.ckpt", "lesiondiffusion_test.yaml", "[24,32,32]"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The three release files, the way the release was made: the VQ first, LINet built on it."""
    folder = tmp_path_factory.mktemp("release") / "weights"
    vq = build_and_save("autoencoder/lesiondiffusion_vq.yaml", folder / "VQ.ckpt",
                        ["model.params.lossconfig.params.perceptual_weight=0"])
    build_and_save("diffusion/maskdiffusion.yaml", folder / "LMNet.ckpt")
    build_and_save("diffusion/lesiondiffusion.yaml", folder / "LINet.ckpt",
                   [f"model.params.first_stage_config.params.ckpt_path={vq}"])
    return folder


def test_the_three_release_files_run_both_stages_with_nothing_else(weights, tmp_path):
    exp_dir = phantom_experiment(tmp_path / "exp", phantom_dataset(tmp_path / "phantoms"), cases=1)
    results = {}
    for stage, checkpoint, config, crop in STAGES:
        overrides = [f"model.params.ckpt_path={weights / checkpoint}", f"inference.exp_dir={exp_dir}",
                     "inference.steps=2", f"inference.crop_size={crop}", "inference.device=cpu",
                     "inference.progress=false", "inference.preview=false"]
        outcome = run_inference(load_config([PIPELINE_DIR / "configs" / "diffusion" / config], overrides))
        results[stage] = outcome.results[0]
        assert results[stage].ok, f"{stage}: {results[stage].error}"
        # The phantoms are 2 mm; the release models were trained at 1 mm.
        assert "differs from the model's training spacing 1 x 1 x 1 mm" in results[stage].warnings[0]
    mask, _ = read_volume(results["lmnet"].outputs["mask"])
    inpainted, _ = read_volume(results["linet"].outputs["image"])
    assert (mask == 2).any() and np.isfinite(inpainted).all()
    assert sorted(os.listdir(weights)) == RELEASE_FILES


def test_info_identifies_each_release_file(weights):
    for name in ("LMNet", "LINet", "VQ"):
        info = convert_checkpoint.describe(weights / f"{name}.ckpt")
        best = info["fits"][0]
        assert (best.name, best.problems) == (name, 0), f"{name}: {convert_checkpoint.info_lines(info)}"
        assert info["format"] == "Lightning checkpoint" and "hyper_parameters" in info["other_entries"]
        assert (info["ema_tensors"] > 0) == (name != "VQ")
    assert all(key.startswith("loss.") for key in best.skipped) and best.skipped


def test_linet_fine_tuning_starts_from_linet_ckpt_alone(weights, tmp_path, monkeypatch):
    alone = tmp_path / "weights"
    alone.mkdir()
    os.link(weights / "LINet.ckpt", alone / "LINet.ckpt")
    make_phantoms(tmp_path / "data", n=3, seed=0, shape=(32, 64, 64), progress=False)
    monkeypatch.chdir(tmp_path)
    config = PIPELINE_DIR / "configs" / "diffusion" / "lesiondiffusion_ft.yaml"
    options = training.build_parser().parse_args(["--base", str(config), "-t", "--name", "ft", "--logdir", "logs",
                                                  "--accelerator", "cpu"])
    run = training.prepare(options, [f"model.params.ckpt_path={alone / 'LINet.ckpt'}", *data_overrides("linet")])
    expected = read_state_dict(alone / "LINet.ckpt")
    loaded = run.model.state_dict()
    for prefix in ("first_stage_model.", "cond_stage_model.", "model.", "model_ema."):
        keys = [key for key in expected if key.startswith(prefix)]
        assert keys and all(torch.equal(loaded[key], expected[key]) for key in keys), prefix
    assert os.listdir(alone) == ["LINet.ckpt"]
