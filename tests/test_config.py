"""Config system: instantiation, merging, overrides, path resolution, errors, seeding."""
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.errors import ConfigError
from ldm.util import (
    PIPELINE_DIR,
    get_obj_from_str,
    instantiate_from_config,
    load_config,
    make_generator,
    parse_overrides,
    resolve_path,
    seed_everything,
)


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_instantiate_builds_target_with_params():
    layer = instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 5}})
    assert isinstance(layer, torch.nn.Linear)
    assert tuple(layer.weight.shape) == (5, 3)


def test_instantiate_without_params_and_sentinels():
    assert isinstance(instantiate_from_config({"target": "torch.nn.Identity"}), torch.nn.Identity)
    assert instantiate_from_config("__is_first_stage__") is None
    assert instantiate_from_config("__is_unconditional__") is None


def test_missing_target_names_the_key_path():
    with pytest.raises(ConfigError, match=r"model\.params\.unet_config: missing 'target'"):
        instantiate_from_config({"params": {}}, key_path="model.params.unet_config")


def test_missing_class_and_module_are_clear():
    with pytest.raises(ConfigError, match=r"model\.target: module 'torch\.nn' has no class or function 'NoSuchLayer'"):
        instantiate_from_config({"target": "torch.nn.NoSuchLayer"}, key_path="model")
    with pytest.raises(ConfigError, match=r"cannot import module 'no_such_package\.models'"):
        get_obj_from_str("no_such_package.models.Thing")
    with pytest.raises(ConfigError, match="not a dotted import path"):
        get_obj_from_str("Linear")


def test_merge_left_to_right_and_overrides(tmp_path):
    base = write_yaml(tmp_path / "base.yaml", "model:\n  lr: 1.0e-4\n  params:\n    width: 16\n    depth: 2\n")
    tweak = write_yaml(tmp_path / "tweak.yaml", "model:\n  params:\n    width: 32\n")
    config = load_config([base, tweak], ["model.params.depth=5", "model.extra.name=abc"])
    assert config.model.params.width == 32
    assert config.model.params.depth == 5
    assert config.model.lr == pytest.approx(1e-4)
    assert config.model.extra.name == "abc"


def test_yaml_paths_resolve_against_pipeline_and_cli_paths_against_cwd(tmp_path, monkeypatch):
    config_file = write_yaml(
        tmp_path / "paths.yaml",
        "data:\n  image_list: ../demo/data/train_image_list.txt\n  crop_shape: [1, 2, 3]\n"
        "  absolute_path: /data/x.txt\n  names_list: [a.txt, b.txt]\n  comment: ../not/a/path\n",
    )
    monkeypatch.chdir(tmp_path)
    config = load_config([config_file], ["model.ckpt_path=weights/vq.ckpt"])
    assert config.data.image_list == str((PIPELINE_DIR / "../demo/data/train_image_list.txt").resolve())
    assert config.data.absolute_path == "/data/x.txt"
    assert list(config.data.names_list) == [str(PIPELINE_DIR / "a.txt"), str(PIPELINE_DIR / "b.txt")]
    assert config.data.comment == "../not/a/path"
    assert list(config.data.crop_shape) == [1, 2, 3]
    assert config.model.ckpt_path == str(tmp_path / "weights" / "vq.ckpt")


def test_interpolations_survive_loading(tmp_path):
    config_file = write_yaml(tmp_path / "i.yaml", "root_dir: data\nimage_list: ${root_dir}/images.txt\n")
    config = load_config([config_file])
    assert config.image_list == str(PIPELINE_DIR / "data") + "/images.txt"


def test_bad_files_and_overrides_give_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([tmp_path / "missing.yaml"])
    broken = write_yaml(tmp_path / "broken.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not a valid YAML config"):
        load_config([broken])
    scalar = write_yaml(tmp_path / "scalar.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level of a config must be a mapping"):
        load_config([scalar])
    with pytest.raises(ConfigError, match="not of the form key.sub=value"):
        parse_overrides(["model.lr"])
    with pytest.raises(ConfigError, match="no config given"):
        load_config([])


def test_resolve_path_keeps_absolute_and_expands_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_path("/x/y") == "/x/y"
    assert resolve_path("~/w.ckpt") == str(tmp_path / "w.ckpt")
    assert resolve_path("a/b", base=tmp_path) == str(tmp_path / "a" / "b")


def test_seeding_reproduces_draws():
    seed_everything(7)
    first = (np.random.rand(3), torch.rand(3))
    seed_everything(7)
    second = (np.random.rand(3), torch.rand(3))
    np.testing.assert_array_equal(first[0], second[0])
    assert torch.equal(first[1], second[1])
    assert torch.equal(torch.randn(4, generator=make_generator(3)), torch.randn(4, generator=make_generator(3)))
    assert not torch.equal(torch.randn(4, generator=make_generator(3)), torch.randn(4, generator=make_generator(4)))


def test_params_from_omegaconf_are_plain_containers():
    config = OmegaConf.create({"target": "collections.OrderedDict", "params": {"a": [1, 2], "b": {"c": 3}}})
    built = instantiate_from_config(config)
    assert built == {"a": [1, 2], "b": {"c": 3}}
    assert type(built["a"]) is list


def test_inherit_merges_parents_first_and_detects_loops(tmp_path):
    write_yaml(tmp_path / "base.yaml", "model:\n  params:\n    width: 16\n    ckpt_path: null\n")
    child = write_yaml(tmp_path / "child.yaml", "inherit: base.yaml\nmodel:\n  params:\n    ckpt_path: w/LMNet.ckpt\n")
    config = load_config([child])
    assert config.model.params.width == 16
    assert config.model.params.ckpt_path == str((PIPELINE_DIR / "w/LMNet.ckpt").resolve())
    assert "inherit" not in config
    write_yaml(tmp_path / "a.yaml", "inherit: b.yaml\n")
    write_yaml(tmp_path / "b.yaml", "inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config([tmp_path / "a.yaml"])
