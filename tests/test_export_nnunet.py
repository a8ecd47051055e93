"""nnU-Net v2 export of phantom experiments: round trip, label schemes, the gate (ignore / drop), real cases,
reruns and errors; the dataset is checked with nnunetv2's own code when it is installed."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from export_nnunet import export_nnunet, main
from ldm.data.volume import read_geometry, read_label, read_volume, write_volume
from ldm.errors import ConfigError, DataError
from inference.source_grid import write_on_source_grid
from test_evaluate_fixtures import PASTE_OPTIONS, phantom_experiment, rewrite_volume

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")


def labels_of(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_export_round_trips(tmp_path):
    exp_dir, manifest = phantom_experiment(tmp_path, n=3)
    result = export_nnunet(exp_dir, tmp_path / "raw", 501, "SynthLesions", progress=False)
    dataset = tmp_path / "raw" / "Dataset501_SynthLesions"
    assert result.dataset_dir == dataset
    declared = json.loads((dataset / "dataset.json").read_text())
    assert {key: declared[key] for key in REQUIRED_KEYS} == {
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2}, "numTraining": 3,
        "file_ending": ".nii.gz"}
    assert declared["lesiondiffusion"]["synthetic_cases"] == 3
    for entry in manifest["cases"]:
        case = entry["case"]
        identifier = f"syn_{case}_0"
        image = dataset / "imagesTr" / f"{identifier}_0000.nii.gz"
        label = dataset / "labelsTr" / f"{identifier}.nii.gz"
        assert image.read_bytes() == (exp_dir / case / "inpainting_0.nii.gz").read_bytes()
        mask, mask_geometry = read_label(exp_dir / case / "samples_0.nii.gz")
        written, written_geometry = read_label(label)
        assert np.array_equal(written, mask) and set(np.unique(written)) == {0, 1, 2}
        assert np.array_equal(written_geometry.affine, read_geometry(image).affine)
        assert written_geometry.shape == read_geometry(image).shape and labels_of(label).dtype == np.uint8
    nnunet_json = pytest.importorskip("nnunetv2.dataset_conversion.generate_dataset_json")
    nnunet_json.generate_dataset_json(str(tmp_path), {0: "CT"}, {"background": 0, "organ": 1, "lesion": 2}, 3,
                                      ".nii.gz", dataset_name="SynthLesions")
    reference = json.loads((tmp_path / "dataset.json").read_text())
    assert {key: declared[key] for key in reference if key in REQUIRED_KEYS + ("name",)} == {
        key: reference[key] for key in REQUIRED_KEYS + ("name",)}


def test_lesion_only_labels(tmp_path):
    exp_dir, _ = phantom_experiment(tmp_path, n=2)
    result = export_nnunet(exp_dir, tmp_path / "raw", 12, "Lesions", labels="lesion", progress=False)
    assert result.labels == {"background": 0, "lesion": 1}
    for case in ("case_000", "case_001"):
        mask, _ = read_label(exp_dir / case / "samples_0.nii.gz")
        written, _ = read_label(result.dataset_dir / "labelsTr" / f"syn_{case}_0.nii.gz")
        assert np.array_equal(written, (mask == 2).astype(written.dtype))


def _add_second_lesion(case_dir, organ_id: int, hu: float) -> np.ndarray:
    """A 2x2x2 second lesion of ``hu`` HU in the organ, away from the first; returns its mask."""
    first = read_label(case_dir / "samples_0.nii.gz")[0] == 2
    organ = read_label(case_dir / "totalseg.nii.gz")[0] == organ_id
    free = ndimage.binary_erosion(organ, iterations=2) & ~ndimage.binary_dilation(first, iterations=8)
    centre = np.argwhere(free)[len(np.argwhere(free)) // 2]
    second = np.zeros_like(first)
    second[tuple(slice(c - 1, c + 1) for c in centre)] = True
    rewrite_volume(case_dir / "samples_0.nii.gz", lambda mask: np.where(second, 2, mask))
    rewrite_volume(case_dir / "inpainting_0.nii.gz", lambda ct: np.where(second, hu, ct))
    return second


def _gate_experiment(tmp_path):
    exp_dir, manifest = phantom_experiment(tmp_path, n=4)
    only = read_label(exp_dir / "case_000/samples_0.nii.gz")[0] == 2
    rewrite_volume(exp_dir / "case_000/inpainting_0.nii.gz", lambda ct: np.where(only, ct + 300, ct))
    second = _add_second_lesion(exp_dir / "case_001", manifest["cases"][1]["organ_id"], 900.0)
    rewrite_volume(exp_dir / "case_002/inpainting_0.nii.gz", lambda ct: ct + 1)
    return exp_dir, manifest, second


def test_only_passed_marks_failed_lesions_ignore_and_drops_what_cannot_be_kept(tmp_path):
    exp_dir, manifest, second = _gate_experiment(tmp_path)
    images = tmp_path / "phantoms" / "train_image_list.txt"
    labels = tmp_path / "phantoms" / "train_label_list.txt"
    result = export_nnunet(exp_dir, tmp_path / "raw", 502, "Gated", only_passed=True, include_real=(images, labels),
                           progress=False)
    assert result.labels == {"background": 0, "organ": 1, "lesion": 2, "ignore": 3}
    assert sorted(case.identifier for case in result.cases) == [
        "real_case_000_image", "real_case_001_image", "real_case_002_image", "syn_case_001_0", "syn_case_003_0"]
    assert sorted(source.split("/")[-2] for source, _ in result.dropped) == ["case_000", "case_002"]
    assert [case.ignored_lesions for case in result.cases if case.identifier == "syn_case_001_0"] == [1]
    mask, _ = read_label(exp_dir / "case_001/samples_0.nii.gz")
    written, _ = read_label(result.dataset_dir / "labelsTr" / "syn_case_001_0.nii.gz")
    distance = ndimage.distance_transform_edt(~second)
    assert np.all(written[second] == 3) and np.all(written[distance < 6] == 3)  # rim 12 mm = 6 voxels of 2 mm
    far = distance >= 6
    assert np.array_equal(written[far], mask[far]) and np.any(written == 2)
    real, _ = read_label(tmp_path / "phantoms" / "case_000" / "label.nii.gz")
    assert np.array_equal(read_label(result.dataset_dir / "labelsTr" / "real_case_000_image.nii.gz")[0], real)
    assert (exp_dir / "quality.csv").is_file()
    declared = json.loads((result.dataset_dir / "dataset.json").read_text())
    assert declared["numTraining"] == 5 and declared["lesiondiffusion"]["ignored_lesions"] == 1
    verify = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    verify.verify_dataset_integrity(str(result.dataset_dir), 1)  # raises on any problem


def _to_user_grid(exp_dir, case: str) -> nib.Nifti1Image:
    """Make ``case`` look as LINet leaves a case whose recorded source CT lies on another grid: the user's CT has
    every voxel split in two along its first file axis (1 mm instead of 2 mm), the standardised output becomes
    ``inpainting_0_std.nii.gz`` and the user-grid pair is written from it. Returns the user's CT."""
    folder = exp_dir / case
    healthy = nib.load(str(folder / "ct.nii.gz"))
    affine = healthy.affine.copy()
    affine[:3, 0] /= 2
    affine[:3, 3] -= affine[:3, 0] / 2
    user = nib.Nifti1Image(np.repeat(np.asanyarray(healthy.dataobj), 2, axis=0).astype(np.int16), affine)
    nib.save(user, str(exp_dir.parent / f"user_{case}.nii.gz"))
    (folder / "inpainting_0.nii.gz").rename(folder / "inpainting_0_std.nii.gz")
    inpainted, std_geometry = read_volume(folder / "inpainting_0_std.nii.gz")
    write_on_source_grid(exp_dir.parent / f"user_{case}.nii.gz", std_geometry, inpainted,
                         read_label(folder / "samples_0.nii.gz")[0], PASTE_OPTIONS["rim_mm"],
                         folder / "inpainting_0.nii.gz", folder / "inpainting_0_label.nii.gz")
    report = json.loads((exp_dir / "linet_report.json").read_text())
    for entry in report["cases"]:
        if entry["case_id"] == case:
            entry["outputs"] = {name: str(folder / f"inpainting_0{suffix}.nii.gz")
                                for name, suffix in (("image", ""), ("label", "_label"), ("standardised", "_std"))}
    (exp_dir / "linet_report.json").write_text(json.dumps(report))
    return user


def test_the_user_grid_pair_is_exported_and_gated_on_its_own_grid(tmp_path):
    exp_dir, _, second = _gate_experiment(tmp_path)
    std_geometry = read_geometry(exp_dir / "case_001/samples_0.nii.gz")
    user = _to_user_grid(exp_dir, "case_001")
    result = export_nnunet(exp_dir, tmp_path / "raw", 505, "UserGrid", only_passed=True, progress=False)
    assert sorted(case.identifier for case in result.cases) == ["syn_case_001_0", "syn_case_003_0"]
    image = result.dataset_dir / "imagesTr" / "syn_case_001_0_0000.nii.gz"
    assert image.read_bytes() == (exp_dir / "case_001/inpainting_0.nii.gz").read_bytes()
    written, geometry = read_label(result.dataset_dir / "labelsTr" / "syn_case_001_0.nii.gz")
    assert geometry.shape == user.shape and np.allclose(geometry.affine, user.affine)
    user_label, _ = read_label(exp_dir / "case_001/inpainting_0_label.nii.gz")
    second_user = geometry.to_memory(np.repeat(std_geometry.to_file(second), 2, axis=0))
    distance = ndimage.distance_transform_edt(~second_user, sampling=geometry.spacing_zyx)
    near, far = distance < PASTE_OPTIONS["rim_mm"], distance >= PASTE_OPTIONS["rim_mm"]
    assert second_user.any() and np.all(written[near] == 3)  # the rim measured in mm on the 1 mm x 2 mm x 2 mm grid
    assert np.array_equal(written[far], user_label[far]) and np.any(written == 2)
    verify = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    verify.verify_dataset_integrity(str(result.dataset_dir), 1)


def test_without_the_user_grid_pair_the_standardised_pair_is_exported(tmp_path):
    exp_dir, _ = phantom_experiment(tmp_path, n=1)
    _to_user_grid(exp_dir, "case_000")
    (exp_dir / "case_000/inpainting_0_label.nii.gz").unlink()  # an experiment folder from before the pair
    result = export_nnunet(exp_dir, tmp_path / "raw", 506, "Older", progress=False)
    image = result.dataset_dir / "imagesTr" / "syn_case_000_0_0000.nii.gz"
    assert image.read_bytes() == (exp_dir / "case_000/inpainting_0_std.nii.gz").read_bytes()
    written, _ = read_label(result.dataset_dir / "labelsTr" / "syn_case_000_0.nii.gz")
    assert np.array_equal(written, read_label(exp_dir / "case_000/samples_0.nii.gz")[0])


def test_only_passed_with_failed_drop_drops_every_case_with_a_failed_lesion(tmp_path):
    exp_dir, _, _ = _gate_experiment(tmp_path)
    result = export_nnunet(exp_dir, tmp_path / "raw", 503, "Strict", labels="lesion", only_passed=True,
                           failed="drop", progress=False)
    assert [case.identifier for case in result.cases] == ["syn_case_003_0"]
    assert result.labels == {"background": 0, "lesion": 1}
    assert {reason.split(" failed")[0] for _, reason in result.dropped} == {"lesion 0", "lesion 1"}


def test_reruns_need_overwrite_and_remove_stale_cases(tmp_path):
    exp_dir, _ = phantom_experiment(tmp_path, n=3)
    export_nnunet(exp_dir, tmp_path / "raw", 504, "Rerun", progress=False)
    with pytest.raises(DataError, match="--overwrite"):
        export_nnunet(exp_dir, tmp_path / "raw", 504, "Rerun", progress=False)
    rewrite_volume(exp_dir / "case_002/inpainting_0.nii.gz", lambda ct: ct + 1)
    result = export_nnunet(exp_dir, tmp_path / "raw", 504, "Rerun", only_passed=True, overwrite=True,
                           progress=False)
    names = sorted(path.name for path in (result.dataset_dir / "imagesTr").iterdir())
    assert names == ["syn_case_000_0_0000.nii.gz", "syn_case_001_0_0000.nii.gz"]
    assert len(list((result.dataset_dir / "labelsTr").iterdir())) == 2
    with pytest.raises(DataError, match="already uses the id"):
        export_nnunet(exp_dir, tmp_path / "raw", 504, "Other", progress=False)
    for dataset_id, name in ((0, "A"), (1000, "A"), (5, "has space"), (5, "")):
        with pytest.raises(ConfigError):
            export_nnunet(exp_dir, tmp_path / "other", dataset_id, name, progress=False)
    with pytest.raises(ConfigError, match="--labels"):
        export_nnunet(exp_dir, tmp_path / "other", 5, "A", labels="organ", progress=False)


def test_bad_real_cases_are_named_and_the_rest_exported(tmp_path, capsys):
    exp_dir, _ = phantom_experiment(tmp_path, n=2)
    real_dir = tmp_path / "real"
    image, geometry = read_volume(tmp_path / "phantoms/case_000/image.nii.gz")
    label, _ = read_label(tmp_path / "phantoms/case_000/label.nii.gz")
    write_volume(real_dir / "good/ct.nii", image, geometry, dtype=np.int16)  # uncompressed: converted to .nii.gz
    write_volume(real_dir / "good/label.nii.gz", label, geometry, dtype=np.uint8)
    write_volume(real_dir / "bad/ct.nii.gz", image, geometry, dtype=np.int16)
    write_volume(real_dir / "bad/label.nii.gz", np.where(label == 2, 5, label), geometry, dtype=np.uint8)
    (real_dir / "images.txt").write_text("good/ct.nii\nbad/ct.nii.gz\n")
    (real_dir / "labels.txt").write_text("good/label.nii.gz\nbad/label.nii.gz\n")
    status = main([str(exp_dir), str(tmp_path / "raw"), "--dataset-id", "7", "--name", "Mixed", "--no-progress",
                   "--include-real", str(real_dir / "images.txt"), str(real_dir / "labels.txt")])
    captured = capsys.readouterr()
    assert status == 1 and "label values [5]" in captured.err and "bad/label.nii.gz" in captured.err
    assert "3 case(s) (2 synthetic, 1 real)" in captured.out
    converted = tmp_path / "raw/Dataset007_Mixed/imagesTr/real_good_ct_0000.nii.gz"
    assert np.array_equal(read_volume(converted)[0], image)
    assert main([str(exp_dir), str(tmp_path / "raw"), "--dataset-id", "7", "--name", "Mixed", "--no-progress"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "already exists" in error
    assert main([str(exp_dir), str(tmp_path / "raw"), "--dataset-id", "8", "--name", "Clean", "--no-progress",
                 "--labels", "lesion"]) == 0
    assert "nnUNetv2_plan_and_preprocess -d 8" in capsys.readouterr().out
