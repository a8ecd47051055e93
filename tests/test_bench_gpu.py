"""bench/gpu.py on a machine without a GPU: says so and exits 0."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: bench/gpu.py would measure")
def test_gpu_benchmark_without_gpu_says_so_and_exits_zero():
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    finished = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py")], capture_output=True, text=True,
                              env=environment, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "no CUDA GPU" in finished.stdout and "s/lesion" not in finished.stdout
