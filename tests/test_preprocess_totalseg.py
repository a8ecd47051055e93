"""The real TotalSegmentator call, offline, with a tiny random-weight stand-in for its 3 mm ``total`` model.

The stand-in follows TotalSegmentator 2.x's folder layout (``Dataset297_..._3mm``) with an nnU-Net plans file of
one small ``3d_fullres`` PlainConvUNet. Its segmentation heads are zeroed with a bias towards one class, so the
whole CT comes out as that organ: a known answer for an otherwise random network.
"""
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import preprocess
from conftest import ROOT
from ldm.data.lists import read_list

SCRIPT = ROOT / "pipeline" / "preprocess.py"
DATASET = "Dataset297_TotalSegmentator_total_3mm_1559subj"
TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
LIVER_V2 = 5


def _plans(patch=32):
    kernels = [[3, 3, 3]] * 3
    resampling = {"order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": DATASET, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [3.0, 3.0, 3.0],
        "original_median_shape_after_transp": [patch] * 3,
        "image_reader_writer": "NibabelIOWithReorient", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "mean": 0.0, "std": 300.0, "percentile_00_5": -1000.0, "percentile_99_5": 1000.0,
            "max": 3000.0, "min": -1024.0, "median": 0.0}},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 1, "patch_size": [patch] * 3, "median_image_size_in_voxels": [patch] * 3,
            "spacing": [3.0, 3.0, 3.0], "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, **resampling},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, **resampling},
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, **resampling},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": kernels, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                    "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": False}},
    }


def build_standin_model(home, answer=LIVER_V2):
    """Write the stand-in fast ``total`` model under ``home`` (a TOTALSEG_HOME_DIR); every voxel -> class ``answer``."""
    from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs_NoMirroring import (
        nnUNetTrainer_4000epochs_NoMirroring)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from totalsegmentator.map_to_binary import class_map

    folder = home / "nnunet" / "results" / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    dataset = {"channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 1,
               "labels": {"background": 0, **{name: int(key) for key, name in class_map["total"].items()}}}
    plans = _plans()
    (folder / "dataset.json").write_text(json.dumps(dataset))
    (folder / "plans.json").write_text(json.dumps(plans))
    manager = PlansManager(plans)
    torch.manual_seed(0)
    network = nnUNetTrainer_4000epochs_NoMirroring.build_network_architecture(
        manager, manager.get_configuration("3d_fullres"), 1,
        manager.get_label_manager(dataset).num_segmentation_heads, enable_deep_supervision=False)
    weights = network.state_dict()
    for name, tensor in weights.items():
        if "seg_layers" in name:
            tensor.zero_()
            if name.endswith("bias"):
                tensor[answer] = 10.0
    torch.save({"network_weights": weights, "trainer_name": TRAINER,
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset},
                "inference_allowed_mirroring_axes": None}, folder / "fold_0" / "checkpoint_final.pth")


def _environment(home):
    env = {key: value for key, value in os.environ.items() if key != "TOTALSEG_WEIGHTS_PATH"}
    env.update(TOTALSEG_HOME_DIR=str(home), OMP_NUM_THREADS="1")
    return env


def test_totalsegmentator_runs_offline_on_the_standin(totalseg_example, tmp_path):
    home = tmp_path / "totalseg"
    build_standin_model(home)
    # A 48 x 48 x 30 crop of the real CT (slicer keeps the affine right): few sliding-window tiles on the CPU.
    ct = tmp_path / "ct_crop.nii.gz"
    nib.save(nib.load(totalseg_example / "example_ct_sm.nii.gz").slicer[40:88, 30:78, :], ct)
    (tmp_path / "imgs.txt").write_text(f"{ct}\n")
    (tmp_path / "attrs.txt").write_text('{"organ type": "liver", "lesion type": "tumor"}\n')
    command = [sys.executable, str(SCRIPT), "imgs.txt", "exp", "attrs.txt", "--seg-fast", "--seg-device", "cpu",
               "--spacing", "3", "--reporter", "offline", "--no-progress"]
    run = subprocess.run(command, cwd=tmp_path, env=_environment(home), capture_output=True, text=True, timeout=500)
    assert run.returncode == 0, run.stderr[-3000:]
    config = json.loads((home / "config.json").read_text())
    assert config["send_usage_stats"] is False
    exp = tmp_path / "exp"
    seg_image = nib.load(read_list(exp / "seg_list.txt")[0])
    ct_image = nib.load(read_list(exp / "img_list.txt")[0])
    assert seg_image.shape == ct_image.shape and np.allclose(seg_image.affine, ct_image.affine)
    assert seg_image.get_data_dtype() == np.uint8
    assert np.unique(np.asanyarray(seg_image.dataobj)).tolist() == [5]  # v2 liver 5 -> v1 liver 5 everywhere
    bbox = np.asanyarray(nib.load(read_list(exp / "bbox_list.txt")[0]).dataobj)
    report = json.loads(open(read_list(exp / "type_list.txt")[0]).read())
    assert (bbox == 2).sum() == np.prod(report["5"][3][1][0])
    seconds = json.loads((exp / "preprocess_report.json").read_text())["cases"][0]["seconds"]
    assert seconds["segment"] > 0


def test_missing_weights_stop_the_run_with_what_to_do(totalseg_example, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "empty_home"))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    (tmp_path / "imgs.txt").write_text(f"{totalseg_example / 'example_ct_sm.nii.gz'}\n")
    (tmp_path / "attrs.txt").write_text('{"organ type": "liver", "lesion type": "tumor"}\n')
    code = preprocess.main([str(tmp_path / "imgs.txt"), str(tmp_path / "exp"), str(tmp_path / "attrs.txt"),
                            "--seg-fast", "--reporter", "offline"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: TotalSegmentator weights for task 'total' (fast) are not installed")
    for hint in ("totalseg_download_weights -t total_fast", "TOTALSEG_HOME_DIR", "TOTALSEG_WEIGHTS_PATH", "--seg-list",
                 DATASET):
        assert hint in err[0]
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("device, expected", [("cpu", "cpu"), ("gpu:1", "gpu:1")])
def test_device_strings(device, expected):
    from preprocessing.segment import resolve_device

    assert resolve_device(device) == expected
    assert resolve_device("auto") == ("gpu" if torch.cuda.is_available() else "cpu")
