"""The whole experiment with the real nnU-Net on the CPU: export with leak-free folds and a paired baseline,
``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train`` (a tiny-epoch trainer written here, found through
``nnUNet_extTrainer``) for both datasets, then ``compare_segmentation.py`` on the fold-0 validation predictions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compare_segmentation import main as compare_main
from export_nnunet import main as export_main
from test_evaluate_fixtures import phantom_experiment

pytest.importorskip("nnunetv2")

TRAINER = "nnUNetTrainerLesionDiffusionTiny"
# One iteration of batch 1 on a 4..32-feature network: nnU-Net's whole pipeline, none of its training time.
TRAINER_SOURCE = f'''
import copy

import torch
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
    nnUNetTrainerNoMirroring)


class {TRAINER}(nnUNetTrainerNoMirroring):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):
        plans = copy.deepcopy(plans)
        settings = plans["configurations"][configuration]
        settings["batch_size"] = 1
        stages = settings["architecture"]["arch_kwargs"]
        stages["features_per_stage"] = [min(4 * 2 ** i, 32) for i in range(stages["n_stages"])]
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = 1
        self.num_val_iterations_per_epoch = 1
        self.num_epochs = 1
'''


def _nnunet(runs: list[list], env: dict, processes: int, folder) -> None:
    """Run nnU-Net command lines of this Python environment side by side (one core each: CI has two), failing
    the test with the output of any that fails; ``processes``: nnU-Net's data-augmentation workers."""
    started = []
    for number, (command, *arguments) in enumerate(runs):
        executable = Path(sys.executable).parent / command
        if not executable.is_file():
            pytest.skip(f"{command} is not installed beside {sys.executable}")
        log = folder / f"{command}_{number}.log"
        with open(log, "w") as output:
            started.append((command, log, subprocess.Popen([str(executable), *map(str, arguments)], stdout=output,
                                                           stderr=subprocess.STDOUT, text=True,
                                                           env={**env, "nnUNet_n_proc_DA": str(processes)})))
    for command, log, process in started:
        assert process.wait(timeout=900) == 0, f"{command} failed:\n{log.read_text()[-4000:]}"


def test_baseline_and_augmented_nnunet_trained_predicted_and_compared(tmp_path, monkeypatch, capsys):
    exp_dir, manifest = phantom_experiment(tmp_path, n=4)
    phantoms = tmp_path / "phantoms"
    cases = [entry["case"] for entry in manifest["cases"]]
    (tmp_path / "real_images.txt").write_text("".join(f"{phantoms / case / 'image.nii.gz'}\n" for case in cases))
    (tmp_path / "real_labels.txt").write_text("".join(f"{phantoms / case / 'label.nii.gz'}\n" for case in cases))
    trainers = tmp_path / "trainers"
    trainers.mkdir()
    (trainers / f"{TRAINER}.py").write_text(TRAINER_SOURCE)
    folders = {name: tmp_path / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    env = {**os.environ, **{name: str(path) for name, path in folders.items()}, "nnUNet_extTrainer": str(trainers),
           "nnUNet_def_n_proc": "1", "nnUNet_compile": "f", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    monkeypatch.setenv("nnUNet_preprocessed", str(folders["nnUNet_preprocessed"]))

    assert export_main([str(exp_dir), str(folders["nnUNet_raw"]), "--dataset-id", "501", "--name", "Phantoms",
                        "--include-real", str(tmp_path / "real_images.txt"), str(tmp_path / "real_labels.txt"),
                        "--folds", "2", "--group-by", "/(case_[0-9]+)/", "--with-baseline", "502", "--no-progress"]) == 0
    splits = {name: json.loads((folders["nnUNet_preprocessed"] / name / "splits_final.json").read_text())
              for name in ("Dataset501_Phantoms", "Dataset502_PhantomsReal")}
    augmented_fold, baseline_fold = splits["Dataset501_Phantoms"][0], splits["Dataset502_PhantomsReal"][0]
    assert augmented_fold["val"] == baseline_fold["val"] and len(baseline_fold["val"]) == 2
    held_out = {name.split("_")[2] for name in augmented_fold["val"]}  # real_case_00k_image -> 00k
    assert {name for name in augmented_fold["train"] if name.startswith("syn_")} == {
        f"syn_case_{number}_0" for number in {case.split("_")[1] for case in cases} - held_out}

    datasets = {502: "Dataset502_PhantomsReal", 501: "Dataset501_Phantoms"}
    _nnunet([["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres", "-npfp", 1, "-np", 1]
             for dataset_id in datasets], env, 1, tmp_path)
    _nnunet([["nnUNetv2_train", dataset_id, "3d_fullres", 0, "-tr", TRAINER, "-device", "cpu"]
             for dataset_id in datasets], env, 0, tmp_path)
    trained = {}
    for name in datasets.values():
        trained[name] = folders["nnUNet_results"] / name / f"{TRAINER}__nnUNetPlans__3d_fullres"
        fold = trained[name] / "fold_0"
        log = "".join(path.read_text() for path in fold.glob("training_log_*.txt"))
        expected = splits[name][0]
        assert "Using splits from existing split file" in log  # nnU-Net's own split loading read our file
        assert f"This split has {len(expected['train'])} training and {len(expected['val'])} validation" in log
        assert sorted(path.name for path in (fold / "validation").glob("*.nii.gz")) == [
            f"{case}.nii.gz" for case in expected["val"]]
    capsys.readouterr()

    status = compare_main([str(trained["Dataset502_PhantomsReal"]), str(trained["Dataset501_Phantoms"]),
                           str(folders["nnUNet_raw"] / "Dataset502_PhantomsReal" / "labelsTr"),
                           "--json", str(tmp_path / "comparison.json"), "--no-progress", "--bootstrap", "200"])
    table = capsys.readouterr().out
    print(table, file=sys.stderr)
    assert status == 0
    assert table.splitlines()[0].split() == ["metric", "baseline", "augmented", "difference", "95%", "CI", "lesions"]
    assert "2 case(s); lesion label 2" in table
    result = json.loads((tmp_path / "comparison.json").read_text())
    assert sorted(case["case"] for case in result["cases"]) == baseline_fold["val"] and not result["errors"]
    rows = {row["metric"]: row for row in result["summary"]}
    assert rows["sensitivity"]["lesions"] == sum(sum(case["baseline"]["lesions"].values())
                                                for case in result["cases"]) > 0
    assert all(0.0 <= rows["dice"][model] <= 1.0 for model in ("baseline", "augmented"))
    assert (tmp_path / "comparison.png").stat().st_size > 0 and (tmp_path / "comparison_cases.csv").is_file()
