"""Shared command-line pieces: config lookup, overrides anywhere, --gpus ids, one-line warnings and errors."""
import argparse
import warnings

import pytest

from ldm.cli import find_config, one_line_warnings, parse_gpus, run_command, split_overrides
from ldm.errors import ConfigError, DataError
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


def test_run_command_gives_the_status_and_one_error_line(capsys):
    def run(args: argparse.Namespace) -> int:
        if args.fail:
            raise DataError("case.nii.gz: file not found")
        warnings.warn_explicit("check this", UserWarning, str(PIPELINE_DIR / "evaluate.py"), 1)
        return 3

    assert run_command(run, argparse.Namespace(fail=False, debug=False), "tool.py") == 3
    assert capsys.readouterr().err.strip() == "warning: check this"
    assert run_command(run, argparse.Namespace(fail=True, debug=False), "tool.py") == 1
    assert capsys.readouterr().err == "tool.py: error: case.nii.gz: file not found\n"
    assert run_command(run, argparse.Namespace(fail=True, debug=False)) == 1
    assert capsys.readouterr().err == "error: case.nii.gz: file not found\n"
    with pytest.raises(DataError, match="file not found"):
        run_command(run, argparse.Namespace(fail=True, debug=True), "tool.py")
