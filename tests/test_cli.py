"""Shared command-line pieces: config lookup, overrides anywhere, --gpus ids, one-line warnings."""
import warnings

import pytest

from ldm.cli import find_config, one_line_warnings, parse_gpus, split_overrides
from ldm.errors import ConfigError
from ldm.util import PIPELINE_DIR


def test_find_config_prefers_the_current_directory_then_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config("configs/demo/lmnet_test.yaml") == str(PIPELINE_DIR / "configs/demo/lmnet_test.yaml")
    local = tmp_path / "configs" / "demo" / "lmnet_test.yaml"
    local.parent.mkdir(parents=True)
    local.write_text("model: {}\n")
    assert find_config("configs/demo/lmnet_test.yaml") == str(local)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        find_config("missing.yaml")


def test_overrides_and_gpu_ids():
    assert split_overrides(["-b", "x.yaml", "model.params.a=1", "--gpus", "0,1", "data.b=c"]) == (
        ["-b", "x.yaml", "--gpus", "0,1"], ["model.params.a=1", "data.b=c"])
    assert parse_gpus(None) == [] and parse_gpus("10,11") == [10, 11]


def test_our_warnings_print_one_line(capsys):
    with one_line_warnings():
        warnings.warn_explicit("box too small", UserWarning, str(PIPELINE_DIR / "preprocess.py"), 1)
    assert capsys.readouterr().err == "warning: box too small\n"
