"""Shared test set-up: one torch thread (the machine has 2 shared cores), paths to the shared data."""
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
UPSTREAM_DEMO = SHARED_DATA / "upstream-demo"
TOTALSEG_EXAMPLE = SHARED_DATA / "totalseg-example"


def require_shared(path: Path) -> Path:
    """Skip the calling test with a clear reason when ../shared/data is not next to this clone."""
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (present in CI; absent in a user's own clone)")
    return path


@pytest.fixture
def upstream_demo() -> Path:
    return require_shared(UPSTREAM_DEMO)


@pytest.fixture
def totalseg_example() -> Path:
    return require_shared(TOTALSEG_EXAMPLE)
