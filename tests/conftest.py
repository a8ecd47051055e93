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


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """Three small phantom cases (32 x 64 x 64, seed 0) that training tests read; a test file needing other
    phantoms defines its own ``phantoms`` fixture, which takes precedence."""
    from demo.make_phantoms import make_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    make_phantoms(out, n=3, seed=0, shape=(32, 64, 64), progress=False)
    return out


@pytest.fixture
def upstream_demo() -> Path:
    return require_shared(UPSTREAM_DEMO)


@pytest.fixture
def totalseg_example() -> Path:
    return require_shared(TOTALSEG_EXAMPLE)


COMPAT = ROOT.parent / "shared" / "compat"


def load_manifest(name: str) -> dict:
    """Key -> shape of a released checkpoint (../shared/compat); skips when the manifests are absent."""
    import json

    path = require_shared(COMPAT / name)
    with open(path) as handle:
        return {key: list(shape) for key, shape in json.load(handle).items()}


def tiny_unet_config(in_channels: int, out_channels: int, context_dim: int = 32) -> dict:
    """A small 3D UNet block (two levels, attention at the lower one) for fast CPU tests."""
    return {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": dict(image_size=[8, 16, 16], in_channels=in_channels, out_channels=out_channels,
                       model_channels=16, attention_resolutions=[2], num_res_blocks=1, channel_mult=[1, 2],
                       num_head_channels=8, use_spatial_transformer=True, context_dim=context_dim, dims=3),
    }


VOCABULARY_ENCODER = {"target": "ldm.modules.encoders.vocabulary.VocabularyEncoder", "params": {"output_dim": 32}}
