"""Safe checkpoint loading, safetensors, ``convert_checkpoint.py``, the up-front file check, the spacing guard and a
CUDA out-of-memory error in one case, on demo-size and tiny models (release-size: test_release_weights.py)."""
import hashlib
import pathlib
import re
import warnings
import weakref

import nibabel as nib
import numpy as np
import pytest
import torch
from checkpoint_fixtures import build_and_save, model_config, save_like_lightning
from conftest import SHARED_DATA
from omegaconf import DictConfig
from pytorch_lightning.utilities.parsing import AttributeDict
from test_inference_fixtures import (inference_config, phantom_dataset, phantom_experiment, randomise,
                                     save_checkpoint)

import convert_checkpoint
from ldm.errors import MissingWeightsError
from ldm.models.checkpoint import UntrustedCheckpointError, load_checkpoint, load_weights, read_checkpoint
from ldm.models.diffusion import samplers
from ldm.modules.encoders.biomedclip import DEFAULT_VOCAB_FILE, BiomedCLIPTextEncoder
from ldm.util import PIPELINE_DIR, instantiate_from_config, load_config
from inference.cases import read_cases
from inference.cli import build_parser, command_overrides
from inference.lmnet import sample_masks
from inference.options import parse_options
from inference.required_files import check_required_files
from inference.runner import load_model, run_inference
from inference.spacing import spacing_warnings

DEMO_TEST = {"lmnet": "demo/lmnet_test.yaml", "linet": "demo/linet_test.yaml"}
DEMO_CROPS = {"lmnet": "[16,32,32]", "linet": "[24,32,32]"}   # small, and room for the lesion and its margins


class Payload:
    """A pickled object that touches a file when unpickled: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo-size VQ, LMNet and LINet (its VQ from vq.ckpt) with random weights, saved the Lightning way, and
    phantoms to run them on."""
    root = tmp_path_factory.mktemp("demo_weights")
    paths = {"vq": build_and_save("demo/vq.yaml", root / "vq.ckpt")}
    for stage, config in (("lmnet", "demo/lmnet.yaml"), ("linet", "demo/linet.yaml")):
        torch.manual_seed(1)
        block = model_config(config, [f"model.params.first_stage_config.params.ckpt_path={paths['vq']}"]
                             if stage == "linet" else [])
        model = instantiate_from_config(block)
        randomise(model)  # zero-initialised output layers would hide lost UNet weights
        paths[stage] = save_like_lightning(model, root / f"{stage}.ckpt", block.params)
    return {"root": root, "phantoms": phantom_dataset(root / "phantoms"), **paths}


def demo_run(stage, checkpoint, exp_dir):
    overrides = [f"model.params.ckpt_path={checkpoint}", f"inference.exp_dir={exp_dir}", "inference.steps=2",
                 f"inference.crop_size={DEMO_CROPS[stage]}", "inference.progress=false", "inference.preview=false"]
    return run_inference(load_config([PIPELINE_DIR / "configs" / DEMO_TEST[stage]], overrides))


def test_lightning_checkpoints_with_omegaconf_objects_load_without_trust(demo, tmp_path):
    content = read_checkpoint(demo["lmnet"])
    assert isinstance(content["hyper_parameters"], DictConfig)
    assert content["hyper_parameters"].unet_config.params.model_channels == 16
    assert {"loops", "callbacks", "optimizer_states", "hparams_type"} <= set(content)
    extra = dict(content, callbacks={"ModelCheckpoint": {"best_model_score": np.float64(0.25),
                                                         "dirpath": pathlib.Path("/runs/x")}},
                 hyper_parameters=AttributeDict(lr=np.float32(2e-5), shape=np.array([64, 152, 152])))
    torch.save(extra, tmp_path / "extra.ckpt")
    reread = read_checkpoint(tmp_path / "extra.ckpt")
    assert reread["callbacks"]["ModelCheckpoint"]["best_model_score"] == 0.25
    assert reread["hyper_parameters"]["shape"].tolist() == [64, 152, 152]
    model = instantiate_from_config(model_config("demo/lmnet.yaml"))
    load_checkpoint(model, tmp_path / "extra.ckpt")
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, content["state_dict"][key]), key


def test_foreign_pickled_objects_are_refused_unless_trusted(tmp_path):
    checkpoint = save_checkpoint("lmnet", tmp_path / "lmnet.ckpt")
    marker = tmp_path / "code_ran"
    content = torch.load(checkpoint, weights_only=True)
    content["callbacks"] = {"Payload": Payload(marker)}
    torch.save(content, checkpoint)
    config = inference_config("lmnet", checkpoint, None)
    refused = r"needs builtins\.getattr, pathlib\.Path, outside.*--trust-checkpoint"
    with pytest.raises(UntrustedCheckpointError, match=refused):
        load_model(config)
    assert not marker.exists()
    config.trust_checkpoint = True
    assert load_model(config).device.type == "cpu"
    assert marker.exists()  # what trusting means: the file's code ran
    args = build_parser().parse_args(["--base", "x.yaml", "--trust-checkpoint"])
    assert "trust_checkpoint=true" in command_overrides(args)


def test_safetensors_round_trip_gives_identical_outputs(demo, tmp_path):
    converted = {stage: tmp_path / f"{stage}.safetensors" for stage in ("lmnet", "linet")}
    for stage, target in converted.items():
        assert convert_checkpoint.main([str(demo[stage]), str(target)]) == 0
        original, copy = read_checkpoint(demo[stage])["state_dict"], read_checkpoint(target)
        assert sorted(copy["state_dict"]) == sorted(original) and copy["global_step"] == 0
        assert copy["state_dict"]["cond_stage_model._extra_state"] == original["cond_stage_model._extra_state"]
        assert any(key.startswith("model_ema.") for key in copy["state_dict"])
    outputs = {}
    for kind, weights in (("ckpt", demo), ("safetensors", converted)):
        exp_dir = phantom_experiment(tmp_path / kind, demo["phantoms"], cases=1)
        lmnet, linet = demo_run("lmnet", weights["lmnet"], exp_dir), demo_run("linet", weights["linet"], exp_dir)
        assert lmnet.results[0].ok and linet.results[0].ok, (lmnet.results[0].error, linet.results[0].error)
        outputs[kind] = [np.asanyarray(nib.load(path).dataobj) for path in
                         (lmnet.results[0].outputs["mask"], linet.results[0].outputs["image"])]
    for from_pickle, from_safetensors in zip(outputs["ckpt"], outputs["safetensors"]):
        np.testing.assert_array_equal(from_pickle, from_safetensors)
    assert (outputs["ckpt"][0] == 2).any()


def test_info_names_the_model_a_file_fits_and_the_keys_that_would_not_load(demo, tmp_path, capsys):
    for stage, name in (("vq", "demo VQ"), ("lmnet", "demo LMNet"), ("linet", "demo LINet")):
        info = convert_checkpoint.describe(demo[stage])
        assert info["fits"][0].name == name and info["fits"][0].problems == 0, stage
        assert info["format"] == "Lightning checkpoint" and info["global_step"] == 0
        assert (info["ema_tensors"] > 0) == (stage != "vq")
    state = read_checkpoint(demo["lmnet"])["state_dict"]
    state["model.extra.weight"] = state.pop("model.out.2.weight")
    torch.save({"state_dict": state}, tmp_path / "renamed.ckpt")
    assert convert_checkpoint.main(["--info", str(tmp_path / "renamed.ckpt")]) == 0
    printed = capsys.readouterr().out
    assert "fits no known model; closest: demo LMNet" in printed
    assert "missing from the file: model.out.2.weight" in printed and "not in the model: model.extra.weight" in printed


def test_info_counts_the_same_keys_on_every_line(demo, capsys):
    state = read_checkpoint(demo["lmnet"])["state_dict"]
    extra = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    assert extra, "the demo LMNet's vocabulary encoder keeps its phrase map as extra state"
    assert convert_checkpoint.main(["--info", str(demo["lmnet"])]) == 0
    printed = capsys.readouterr().out
    counts = {int(count) for count in re.findall(r"(\d+) keys", printed)}
    assert counts == {len(state)}, printed
    assert f"{len(state) - len(extra)} tensors and {len(extra)} non-tensor extra state" in printed


def test_version_dependent_keys_are_skipped_with_a_note_and_nothing_else():
    holder = torch.nn.Module()
    holder.cond_stage_model = BiomedCLIPTextEncoder(bert_config=dict(vocab_size=64, hidden_size=8,
                                                                     num_hidden_layers=1, num_attention_heads=2,
                                                                     intermediate_size=16, max_position_embeddings=16),
                                                    context_length=16, output_dim=8)
    state = {key: torch.randn_like(value) for key, value in holder.state_dict().items()}
    old_buffer = "cond_stage_model.model.transformer.embeddings.position_ids"
    with pytest.warns(UserWarning, match=re.escape(old_buffer)):
        missing, unexpected = load_weights(holder, {**state, old_buffer: torch.arange(16)[None]}, source="old.ckpt")
    assert unexpected == [old_buffer] and missing == []
    assert all(torch.equal(value, state[key]) for key, value in holder.state_dict().items())
    with pytest.raises(MissingWeightsError, match=r"unexpected: cond_stage_model\.model\.transformer\.pooler"):
        load_weights(holder, {**state, "cond_stage_model.model.transformer.pooler.dense.weight": torch.zeros(8, 8)})


def test_required_files_are_named_up_front_with_where_to_get_them(tmp_path):
    release = PIPELINE_DIR / "configs" / "diffusion" / "maskdiffusion_test.yaml"
    absent = tmp_path / "absent"
    config = load_config([release], [f"model.params.ckpt_path={absent}/LMNet.ckpt",
                                     f"model.params.cond_stage_config.params.vocab_file={absent}/vocab.txt"])
    with pytest.raises(MissingWeightsError) as raised:
        check_required_files(config)
    message = str(raised.value)
    assert message.startswith("2 files are missing: ")
    assert f"{absent}/LMNet.ckpt: checkpoint not found (model.params.ckpt_path); get it from the original" in message
    assert f"{absent}/vocab.txt: vocabulary not found" in message and "Hugging Face" in message
    (tmp_path / "LMNet.ckpt").write_bytes(b"weights")
    (tmp_path / "folder.ckpt").mkdir()
    # The text tower's weight file is not needed when the checkpoint holds it ...
    check_required_files(load_config([release], [f"model.params.ckpt_path={tmp_path}/LMNet.ckpt"]))
    # ... but it is when the checkpoint's text-tower keys are ignored, and a folder is no checkpoint.
    ignored = load_config([release], [f"model.params.ckpt_path={tmp_path}/folder.ckpt",
                                      "model.params.ignore_keys=[cond_stage_model.]"])
    with pytest.raises(MissingWeightsError, match=r"folder\.ckpt: checkpoint is not a file.*"
                                                  r"open_clip_pytorch_model\.bin: weights file not found"):
        check_required_files(ignored)


def test_synthesize_stops_before_preprocessing_when_weights_are_missing(tmp_path, capsys):
    import synthesize

    status = synthesize.main(["--ct", str(tmp_path / "ct.nii.gz"), "--organ", "liver", "--lesion", "cyst",
                              "--out", str(tmp_path / "out"), "--set", f"model.params.ckpt_path={tmp_path}/x.ckpt"])
    assert status == 1 and not (tmp_path / "out").exists()
    assert f"{tmp_path}/x.ckpt: checkpoint not found" in capsys.readouterr().err


def test_spacing_guard_names_cases_off_the_training_spacing(demo, tmp_path):
    exp_dir = phantom_experiment(tmp_path / "exp", demo["phantoms"], cases=2)
    cases = read_cases(exp_dir, dict(parse_options({}, "lmnet").lists))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = spacing_warnings(cases, parse_options({"training_spacing_mm": 1.0}, "lmnet"))
    assert sorted(found) == [0, 1] and "preprocess.py --spacing" in found[0]
    for case, warning in zip(cases, caught):
        assert re.match(rf"{case.case_id}: spacing 2 x 2 x 2 mm .* training spacing 1 x 1 x 1", str(warning.message))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for options in ({"training_spacing_mm": [2.05, 2, 1.95]}, {}):
            assert spacing_warnings(cases, parse_options(options, "lmnet")) == {}


def test_out_of_memory_in_one_case_frees_memory_and_the_next_case_runs(tmp_path, monkeypatch):
    phantoms = phantom_dataset(tmp_path / "phantoms")
    exp_dir = phantom_experiment(tmp_path / "exp", phantoms, cases=2)
    config = inference_config("lmnet", save_checkpoint("lmnet", tmp_path / "lmnet.ckpt"), exp_dir, steps=2,
                              attempts=1)
    options = parse_options(config.inference, "lmnet")
    model = load_model(config)
    step, failed_step_tensors, emptied = samplers.DDIMSampler.step, [], []

    def step_out_of_memory_once(self, eps, index, x, generator=None):
        if not failed_step_tensors:
            activations = torch.empty(1 << 20)
            failed_step_tensors.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                              "capacity of 79.19 GiB of which 1.06 GiB is free.")
        return step(self, eps, index, x, generator)

    monkeypatch.setattr(samplers.DDIMSampler, "step", step_out_of_memory_once)
    # Test doubles for a GPU that this machine does not have: the allocator's cache is "emptied" into a list.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    first, second = sample_masks(model, read_cases(exp_dir, dict(options.lists)), options)
    assert first.status == "failed" and second.ok
    assert first.error.startswith(f"{first.case_id}: CUDA out of memory while trying to allocate 2.00 GiB; "
                                  "the memory was freed")
    assert emptied == [True] and failed_step_tensors[0]() is None


def test_the_biomedclip_tokenizer_ships_with_the_project():
    readme = (DEFAULT_VOCAB_FILE.parent / "README.md").read_text()
    recorded = re.search(r"sha256 `([0-9a-f]{64})`", readme).group(1)
    assert hashlib.sha256(DEFAULT_VOCAB_FILE.read_bytes()).hexdigest() == recorded
    assert "MIT License" in (DEFAULT_VOCAB_FILE.parent / "LICENSE.md").read_text()
    shared = SHARED_DATA / "biomedclip" / "vocab.txt"
    if shared.is_file():
        assert shared.read_bytes() == DEFAULT_VOCAB_FILE.read_bytes()
    encoder = BiomedCLIPTextEncoder(bert_config=dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=16), output_dim=8, allow_random_weights=True)
    pieces = DEFAULT_VOCAB_FILE.read_text(encoding="utf-8").splitlines()
    assert len(pieces) == 28895
    ids = {piece: index for index, piece in enumerate(pieces)}
    assert encoder.tokenize(["Liver Cyst"]).tolist() == [[ids["[CLS]"], ids["liver"], ids["cyst"], ids["[SEP]"]]]
    assert encoder([{"shape": "round-like,"}]).shape == (1, 1, 8)
