"""``pipeline/test.py`` on the command line: YAML configs, exit status and summary, clear one-line errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_inference_fixtures import inference_config, phantom_dataset, phantom_row, save_checkpoint, write_lists

from ldm.util import load_config
from inference.cli import main
from inference.options import parse_options
from inference.runner import config_stage

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipeline"
TEST_PY = ROOT / "pipeline" / "test.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    phantoms = phantom_dataset(root / "phantoms")
    configs = {}
    for stage in ("lmnet", "linet"):
        config = inference_config(stage, save_checkpoint(stage, root / f"{stage}.ckpt"), None)
        configs[stage] = root / f"{stage}_test.yaml"
        OmegaConf.save(config, configs[stage])
    return {"root": root, "phantoms": phantoms, "configs": configs}


def test_test_py_runs_both_stages_and_exits_1_naming_the_failed_case(setup):
    exp_dir = setup["root"] / "exp"
    good = phantom_row(exp_dir, setup["phantoms"], "case_006")
    missing_type = phantom_row(exp_dir, setup["phantoms"], "case_000")
    missing_type["type"] = exp_dir / "case_000" / "absent.json"
    write_lists(exp_dir, [good, missing_type])
    environment = {**os.environ, "PYTHONWARNINGS": "ignore"}
    reasons = {"lmnet": "absent.json: report file not found", "linet": "samples_0.nii.gz: lesion mask not found"}
    for stage, written in (("lmnet", "samples_0.nii.gz"), ("linet", "inpainting_0.nii.gz")):
        command = [sys.executable, str(TEST_PY), "--base", str(setup["configs"][stage]), "--exp", "exp",
                   "--steps", "2", "inference.seed=3"]
        finished = subprocess.run(command, cwd=setup["root"], capture_output=True, text=True, env=environment,
                                  timeout=300)
        assert finished.returncode == 1, finished.stderr
        assert f"case_006: 1 lesion(s) -> {written}" in finished.stdout
        assert "case_000: FAILED:" in finished.stdout and reasons[stage] in finished.stdout
        assert "1 case(s) failed: case_000" in finished.stderr and "Traceback" not in finished.stderr
        assert (exp_dir / "case_006" / written).is_file()
    assert "masks listed for LINet" not in finished.stdout   # printed by the LMNet run only
    rows = (exp_dir / "label_list.txt").read_text().split()
    assert rows == ["case_006/samples_0.nii.gz", "case_000/samples_0.nii.gz"]


def test_errors_are_one_line_with_exit_status_1(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lmnet = str(setup["configs"]["lmnet"])
    assert main(["--base", lmnet]) == 1
    assert "pass --exp DIR" in capsys.readouterr().err
    assert main(["--base", lmnet, "--exp", "nowhere"]) == 1
    assert "nowhere: experiment folder not found" in capsys.readouterr().err
    exp_dir = write_lists(tmp_path / "exp", [phantom_row(tmp_path / "exp", setup["phantoms"], "case_006")])
    assert main(["--base", lmnet, "--exp", str(exp_dir), "inference.ddim_step=3"]) == 1
    assert "unknown setting(s) ['ddim_step']" in capsys.readouterr().err
    assert main(["--base", lmnet, "--exp", str(exp_dir), "model.params.ckpt_path=missing.ckpt"]) == 1
    assert "missing.ckpt: checkpoint not found" in capsys.readouterr().err


@pytest.mark.parametrize("config, weights", [("diffusion/maskdiffusion_test.yaml", "weights/LMNet.ckpt"),
                                             ("diffusion/lesiondiffusion_test.yaml", "weights/LINet.ckpt"),
                                             ("demo/lmnet_test.yaml", "demo/checkpoints/lmnet.ckpt"),
                                             ("demo/linet_test.yaml", "demo/checkpoints/linet.ckpt")])
def test_shipped_test_configs_parse(setup, tmp_path, capsys, monkeypatch, config, weights):
    config_file = PIPELINE / "configs" / config
    loaded = load_config([config_file])
    stage = config_stage(loaded)
    options = parse_options(loaded.inference, stage)
    assert loaded.model.params.ckpt_path == str(ROOT / weights) and options.exp_dir is None
    if stage == "linet":
        assert loaded.model.params.unet_config.params.skip_context is False
        assert loaded.model.params.first_stage_config.params.ckpt_path is None
    exp_dir = tmp_path / "exp"
    write_lists(exp_dir, [phantom_row(exp_dir, setup["phantoms"], "case_006")])
    (exp_dir / "label_list.txt").write_text("case_006/bbox.nii.gz\n")
    # From the repository root, as the docs write it: the config path falls back to pipeline/.
    monkeypatch.chdir(ROOT)
    assert main(["--base", f"configs/{config}", "--exp", str(exp_dir), "model.params.ckpt_path=absent.ckpt"]) == 1
    assert "absent.ckpt: checkpoint not found (model.params.ckpt_path)" in capsys.readouterr().err
