"""Leak-free folds (experiments.splits), the type-balanced synthetic sample, and their use by export_nnunet.py:
splits_final.json beside the dataset and under $nnUNet_preprocessed, the paired baseline, --synthetic-per-real."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from experiments.sampling import balanced_order
from experiments.splits import SplitCase, build_splits, case_keys, compile_group_by
from export_nnunet import export_nnunet, main
from ldm.errors import ConfigError
from test_evaluate_fixtures import phantom_experiment


def _cohort() -> list[SplitCase]:
    """12 real CTs of 10 patients (patients 3 and 7 have two CTs each), two synthetic cases from each real CT,
    and three from healthy CTs of patients without a real case; lesion types liver and kidney alternate."""
    real, synthetic = [], []
    ct_names = [f"/data/patient_{p:02d}/ct_{scan}.nii.gz" for p in range(10) for scan in ("a", "b")[:1 + (p in (3, 7))]]
    for number, path in enumerate(ct_names):
        real.append(SplitCase(f"real_{number:02d}", "real", path))
        for k in range(2):
            synthetic.append(SplitCase(f"syn_{number:02d}_{k}", "synthetic", path, ("liver", "kidney")[k]))
    for p in (20, 21, 22):
        synthetic.append(SplitCase(f"syn_healthy_{p}", "synthetic", f"/healthy/patient_{p}/ct.nii.gz", "liver"))
    return real + synthetic


def _leaks(cases, folds, pattern):
    by_id = {case.identifier: case for case in cases}
    problems = []
    for number, fold in enumerate(folds):
        held_out = set().union(*(case_keys(by_id[name], pattern) for name in fold["val"]))
        problems += [(number, name) for name in fold["train"] if case_keys(by_id[name], pattern) & held_out]
    return problems


def test_folds_hold_out_every_real_case_once_and_no_synthetic_case_leaks():
    cases = _cohort()
    real = {case.identifier for case in cases if case.kind == "real"}
    splits = build_splits(cases, folds=5, seed=4, group_by=r"patient_(\d+)")
    folds = splits.folds
    validated = Counter(name for fold in folds for name in fold["val"])
    assert set(validated) == real and set(validated.values()) == {1}
    assert all(name.startswith("real_") for fold in folds for name in fold["val"])
    assert _leaks(cases, folds, compile_group_by(r"patient_(\d+)")) == []
    for fold in folds:
        assert set(fold["train"]) & real == real - set(fold["val"])
        assert {"syn_healthy_20", "syn_healthy_21", "syn_healthy_22"} <= set(fold["train"])
        # the synthetic cases of every CT not validated here (and of no validated patient) train here
        held = {name[5:7] for name in fold["val"]}
        assert {name for name in fold["train"] if name.startswith("syn_0") or name.startswith("syn_1")} == {
            f"syn_{number}_{k}" for number in {name[5:7] for name in real} - held for k in range(2)}
    patient_3 = [number for number, fold in enumerate(folds) if {"real_03", "real_04"} & set(fold["val"])]
    assert len(patient_3) == 1 and {"real_03", "real_04"} <= set(folds[patient_3[0]]["val"])  # one patient, one fold
    sizes = [len(fold["val"]) for fold in folds]
    assert max(sizes) - min(sizes) <= 2
    assert build_splits(cases, 5, seed=4, group_by=r"patient_(\d+)").folds == folds
    assert build_splits(cases, 5, seed=5, group_by=r"patient_(\d+)").folds != folds


def test_without_group_by_only_the_source_ct_ties_cases():
    cases = _cohort()
    splits = build_splits(cases, folds=12, seed=0)  # 12 CTs: each its own fold
    assert _leaks(cases, splits.folds, None) == [] and sorted(len(fold["val"]) for fold in splits.folds) == [1] * 12
    with pytest.raises(ConfigError, match="only 10 independent"):
        build_splits(cases, folds=12, seed=0, group_by=r"patient_(\d+)")


def test_synthetic_per_real_takes_a_seeded_type_balanced_share_of_each_fold():
    cases = _cohort()
    splits = build_splits(cases, folds=4, seed=1, group_by=r"patient_(\d+)", synthetic_per_real=0.5)
    for fold in splits.folds:
        real_train = [name for name in fold["train"] if name.startswith("real_")]
        synthetic = [name for name in fold["train"] if name.startswith("syn_")]
        assert len(synthetic) == round(0.5 * len(real_train))
        types = Counter("kidney" if name.endswith("_1") else "liver" for name in synthetic)
        assert abs(types["liver"] - types["kidney"]) <= 2
    assert _leaks(cases, splits.folds, compile_group_by(r"patient_(\d+)")) == []
    assert splits.synthetic_used == {name for fold in splits.folds for name in fold["train"] if name.startswith("syn")}
    order = balanced_order([case for case in cases if case.kind == "synthetic"], seed=1)
    assert Counter(case.lesion_type for case in order[:10]) == {"liver": 5, "kidney": 5}
    assert [case.identifier for case in balanced_order(order, seed=1)] == [case.identifier for case in order]
    capped = build_splits(cases, folds=4, seed=1, synthetic_per_real=100)
    assert any("instead of" in note for note in capped.notes)


def test_bad_split_options_raise_config_errors():
    cases = _cohort()
    with pytest.raises(ConfigError, match="only 10 independent"):
        build_splits(cases, folds=11, group_by=r"patient_(\d+)")
    for folds in (1, 0, 2.5, True):
        with pytest.raises(ConfigError, match="--folds"):
            build_splits(cases, folds=folds)
    with pytest.raises(ConfigError, match="--group-by"):
        build_splits(cases, folds=2, group_by="patient_(")
    with pytest.raises(ConfigError, match="--include-real"):
        build_splits([case for case in cases if case.kind == "synthetic"], folds=2)
    with pytest.raises(ConfigError, match="--synthetic-per-real"):
        build_splits(cases, folds=2, synthetic_per_real=-1)


def _record_sources(exp_dir, phantoms, cases):
    """Make each case's input look standardised by preprocess.py from the real phantom CT (its preprocess.json)."""
    for case in cases:
        record = {"source_ct": str(phantoms / case / "image.nii.gz"), "outputs": {"img": "ct.nii.gz"}}
        (exp_dir / case / "preprocess.json").write_text(json.dumps(record))


def _real_lists(tmp_path, cases):
    phantoms = tmp_path / "phantoms"
    (tmp_path / "images.txt").write_text("".join(f"{phantoms / case / 'image.nii.gz'}\n" for case in cases))
    (tmp_path / "labels.txt").write_text("".join(f"{phantoms / case / 'label.nii.gz'}\n" for case in cases))
    return tmp_path / "images.txt", tmp_path / "labels.txt"


def test_export_writes_leak_free_splits_a_paired_baseline_and_places_them(tmp_path, monkeypatch):
    exp_dir, manifest = phantom_experiment(tmp_path, n=4)
    cases = [entry["case"] for entry in manifest["cases"]]
    _record_sources(exp_dir, tmp_path / "phantoms", cases)
    preprocessed = tmp_path / "preprocessed"
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    result = export_nnunet(exp_dir, tmp_path / "raw", 601, "Mixed", include_real=_real_lists(tmp_path, cases),
                           folds=2, seed=0, with_baseline=602, progress=False)
    folds = json.loads((result.dataset_dir / "splits_final.json").read_text())
    assert folds == result.folds == json.loads((preprocessed / "Dataset601_Mixed/splits_final.json").read_text())
    for fold in folds:  # matched by the recorded source CT: syn_case_00k_0 was made from real_case_00k_image
        held_out = {name.split("_")[2] for name in fold["val"]}
        assert sorted(name for name in fold["train"] if name.startswith("syn_")) == [
            f"syn_case_{k}_0" for k in sorted({c.split("_")[1] for c in cases} - held_out)]
    baseline = tmp_path / "raw" / "Dataset602_MixedReal"
    assert result.baseline_dir == baseline
    real = sorted(f"real_{case}_image" for case in cases)
    assert sorted(path.name for path in (baseline / "labelsTr").iterdir()) == [f"{name}.nii.gz" for name in real]
    for name in real:
        for folder, file_name in (("imagesTr", f"{name}_0000.nii.gz"), ("labelsTr", f"{name}.nii.gz")):
            assert (baseline / folder / file_name).read_bytes() == (result.dataset_dir / folder / file_name).read_bytes()
    baseline_folds = json.loads((preprocessed / "Dataset602_MixedReal/splits_final.json").read_text())
    assert [fold["val"] for fold in baseline_folds] == [fold["val"] for fold in folds]
    assert [fold["train"] for fold in baseline_folds] == [[n for n in fold["train"] if n.startswith("real_")]
                                                          for fold in folds]
    assert json.loads((baseline / "dataset.json").read_text())["numTraining"] == 4
    crossval = pytest.importorskip("nnunetv2.utilities.crossval_split")
    reference = crossval.generate_crossval_split(real, seed=0, n_splits=2)  # nnU-Net's own split format
    assert [{key: type(value) for key, value in fold.items()} for fold in reference] == [
        {key: type(value) for key, value in fold.items()} for fold in folds]
    verify = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    verify.verify_dataset_integrity(str(baseline), 1)


def test_export_caps_synthetic_cases_and_prints_the_copy_command(tmp_path, monkeypatch, capsys):
    exp_dir, manifest = phantom_experiment(tmp_path, n=4)
    cases = [entry["case"] for entry in manifest["cases"]]
    images, labels = _real_lists(tmp_path, cases[:2])
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    assert main([str(exp_dir), str(tmp_path / "raw"), "--dataset-id", "611", "--name", "Capped", "--no-progress",
                 "--include-real", str(images), str(labels), "--synthetic-per-real", "1.0"]) == 0
    written = sorted(path.name for path in (tmp_path / "raw/Dataset611_Capped/labelsTr").iterdir())
    kept = [name for name in written if name.startswith("syn_")]
    assert len(kept) == 2 and len(written) == 4
    assert kept != ["syn_case_000_0.nii.gz", "syn_case_001_0.nii.gz"]  # two lesion types of liver, liver, kidney, spleen
    assert not (tmp_path / "raw/Dataset611_Capped/splits_final.json").exists()
    assert main([str(exp_dir), str(tmp_path / "raw"), "--dataset-id", "611", "--name", "Capped", "--no-progress",
                 "--include-real", str(images), str(labels), "--folds", "2", "--overwrite",
                 "--group-by", "/(case_[0-9]+)/"]) == 0
    printed = capsys.readouterr().out
    assert "note: 2 synthetic case(s) that no training uses are left out" in printed
    assert "2 folds over the real cases" in printed
    assert 'nnUNet_preprocessed is not set; after setting it: mkdir -p "$nnUNet_preprocessed/Dataset611_Capped"' in printed
    folds = json.loads((tmp_path / "raw/Dataset611_Capped/splits_final.json").read_text())
    assert {name for fold in folds for name in fold["train"] if name.startswith("syn_")} >= {
        "syn_case_002_0", "syn_case_003_0"}
    assert main([str(exp_dir), str(tmp_path / "raw"), "--dataset-id", "612", "--name", "NoReal", "--folds", "2",
                 "--no-progress"]) == 1
    assert "--folds: needs real cases" in capsys.readouterr().err
