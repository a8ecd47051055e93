"""bench/gpu.py: on a machine without a GPU it says so and exits 0; ``--device cpu`` runs its whole measuring path
(every sampler, bf16 autocast, the streamed VQ) with tiny shapes, with random weights and with checkpoints that hold
the text encoder's weights (which it skips: it uses a random context)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.diffusion.samplers import SAMPLERS
from ldm.util import PIPELINE_DIR, instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIGS = {"lmnet": "configs/demo/lmnet_test.yaml", "linet": "configs/demo/linet_test.yaml"}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_with_checkpoint(stage: str, folder: Path) -> Path:
    """The demo test config of ``stage`` pointing at a checkpoint of its model (random weights, every key the
    trained demo checkpoint has, ``cond_stage_model.*`` included)."""
    config = load_config([PIPELINE_DIR / DEMO_CONFIGS[stage]], ["model.params.ckpt_path=null"])
    model = instantiate_from_config(config.model, key_path="model")
    assert any(key.startswith("cond_stage_model.") for key in model.state_dict())
    checkpoint = folder / f"{stage}.ckpt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    config.model.params.ckpt_path = str(checkpoint)
    OmegaConf.save(config, folder / f"{stage}_test.yaml")
    return folder / f"{stage}_test.yaml"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: bench/gpu.py would measure")
def test_gpu_benchmark_without_gpu_says_so_and_exits_zero():
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    finished = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py")], capture_output=True, text=True,
                              env=environment, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "no CUDA GPU" in finished.stdout and "s/lesion" not in finished.stdout


@pytest.mark.parametrize("with_checkpoints", [False, True], ids=["random-weights", "checkpoints"])
def test_cpu_mode_measures_every_row(tmp_path, capsys, with_checkpoints):
    bench = load_bench()
    argv = ["--device", "cpu", "--json"]
    if with_checkpoints:
        argv += ["--lmnet-config", str(config_with_checkpoint("lmnet", tmp_path)),
                 "--linet-config", str(config_with_checkpoint("linet", tmp_path))]
        loaded, _ = bench.build(argv[-1], torch.device("cpu"))
        assert loaded.cond_stage_model is None   # the checkpoint loaded strictly but for the skipped encoder
    assert bench.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    fast = [name for name in SAMPLERS if name not in ("ddim", "ddpm")]
    expected = [("ddim", "fp32"), ("ddim", "bf16")] + [(name, "bf16") for name in fast]
    for stage in ("LMNet sampling", "LINet encode+sampling+decode", "end to end (LMNet + LINet)"):
        assert [(row["sampler"], row["precision"]) for row in rows if row["stage"] == stage] == expected
    assert all(row["seconds"] > 0 and row["peak_gib"] > 0 for row in rows)
    assert rows[-1]["stage"] == "VQ decode, streamed" and rows[-1]["size"] == "16x32x32"
