"""The quality gate on phantom experiments: measured values match the known lesions, each deliberately wrong lesion
fails the check it should, the CSV/JSON/PNG are written, the CLI and the ``test.py`` hook behave."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from matplotlib.image import imread
from scipy import ndimage

from evaluate import evaluate_experiment, main, run_evaluation
from inference.results import CaseResult, write_run_report
from ldm.data.volume import read_label, read_volume
from quality.gate import apply_quality_gate
from quality.tables import COLUMNS
from test_evaluate_fixtures import edit_report, phantom_experiment, rewrite_volume, write_linet_report

# Lesion kinds take turns in the phantoms: cyst, liver tumour, kidney, spleen, bladder wall, then again.
N_CASES = 6


@pytest.mark.parametrize("orientation", ["LPS", "RAS"])
def test_measurements_match_the_phantom_truth(tmp_path, orientation):
    exp_dir, manifest = phantom_experiment(tmp_path, n=5, orientation=orientation)
    lesions = evaluate_experiment(exp_dir, progress=False)
    assert [lesion.case for lesion in lesions] == [entry["case"] for entry in manifest["cases"]]
    spacing = manifest["parameters"]["spacing"]
    for lesion, truth in zip(lesions, manifest["cases"]):
        report = json.loads((exp_dir / truth["case"] / "type.json").read_text())
        attributes = report[str(truth["organ_id"])][2]
        size = tuple(int(v) for v in attributes["size"].strip("[] pixel,").split())
        assert lesion.organ == truth["organ"] and lesion.organ_id == truth["organ_id"]
        assert lesion.voxels == truth["lesion_voxels"]
        assert lesion.volume_mm3 == pytest.approx(truth["lesion_voxels"] * np.prod(spacing))
        assert lesion.mean_hu == pytest.approx(truth["mean_hu"], abs=0.006)  # manifest rounds to 0.01 HU
        # The report holds the whole-lesion mean (rounded); the gate compares the interior (one voxel eroded).
        assert lesion.hu_error == pytest.approx(lesion.interior_mean_hu - lesion.requested_hu, abs=1e-3)
        assert abs(lesion.hu_error) <= 8.0  # the phantoms' texture differs between rim and interior
        assert lesion.extent_vox == lesion.requested_size_vox == size  # the report counts along the file axes
        assert lesion.extent_ratio_min == lesion.extent_ratio_max == 1.0
        assert lesion.inside_organ_fraction == 1.0
        assert lesion.verdict("density").verdict == "agree", lesion.verdict("density")
        if truth["organ"] != "urinary bladder":  # the bladder's reference mixes fluid and wall
            assert lesion.organ_reference_hu == pytest.approx(truth["organ_mean_hu"], abs=3.0)
        assert (lesion.components, lesion.box, lesion.changed_outside_voxels) == (1, 1, 0)
        assert lesion.margin_gradient_hu_per_mm > 5.0
        assert lesion.passed, (lesion.case, lesion.failed_checks)
    image = imread(exp_dir / "quality.png")
    assert not _red_pixels(image).any()  # no failed lesion, no red cross


def _red_pixels(image: np.ndarray) -> np.ndarray:
    return (image[..., 0] > 0.75) & (image[..., 1] < 0.35) & (image[..., 2] < 0.3)


def test_each_wrong_lesion_fails_its_check(tmp_path):
    exp_dir, manifest = phantom_experiment(tmp_path, n=N_CASES)
    lesion_of = {entry["case"]: read_label(exp_dir / entry["case"] / "samples_0.nii.gz")[0] == 2
                 for entry in manifest["cases"]}
    rewrite_volume(exp_dir / "case_000/inpainting_0.nii.gz",
                   lambda ct: np.where(lesion_of["case_000"], ct + 300, ct))
    corner = (0, 0, 0)
    rewrite_volume(exp_dir / "case_001/inpainting_0.nii.gz", lambda ct: _set(ct, corner, ct[corner] + 40))
    rewrite_volume(exp_dir / "case_002/totalseg.nii.gz", lambda seg: np.where(lesion_of["case_002"], 0, seg))
    report = json.loads((exp_dir / "case_003/type.json").read_text())
    size = [3 * int(v) for v in next(iter(report.values()))[2]["size"].strip("[] pixel,").split()]
    edit_report(exp_dir / "case_003/type.json", size=f"[[{size[0]} {size[1]} {size[2]}]] pixel,")
    # case_004: a second mask piece far from the lesion, in the same (now whole-volume) box.
    far = tuple(int(v) for v in np.argwhere(~ndimage.binary_dilation(lesion_of["case_004"], iterations=8))[0])
    rewrite_volume(exp_dir / "case_004/samples_0.nii.gz", lambda mask: _set(mask, far, 2))
    rewrite_volume(exp_dir / "case_004/bbox.nii.gz", lambda box: np.full_like(box, 2))

    evaluation = run_evaluation(exp_dir, progress=False)
    by_case = {}
    for lesion in evaluation.lesions:
        by_case.setdefault(lesion.case, []).append(lesion)
    assert by_case["case_000"][0].failed_checks == ["hu", "density"]
    assert by_case["case_000"][0].hu_error == pytest.approx(300.0 + lesion_mean_gap(by_case["case_000"][0]), abs=0.5)
    assert by_case["case_001"][0].failed_checks == ["unchanged_outside"]
    assert (by_case["case_001"][0].changed_outside_voxels, by_case["case_001"][0].changed_outside_max_abs_hu) == (1, 40)
    assert by_case["case_002"][0].failed_checks == ["inside_organ"]
    assert by_case["case_002"][0].inside_organ_fraction == 0.0
    assert by_case["case_003"][0].failed_checks == ["volume", "extent"]
    assert by_case["case_003"][0].extent_ratio_max == pytest.approx(1 / 3, abs=1e-3)
    main_lesion, piece = by_case["case_004"]
    assert main_lesion.failed_checks == ["components"] and (main_lesion.components, piece.components) == (2, 2)
    assert piece.voxels == 1 and "components" in piece.failed_checks
    assert by_case["case_005"][0].passed
    summary = json.loads((exp_dir / "quality_summary.json").read_text())
    designed = {"hu": 1, "density": 1, "inside_organ": 1, "volume": 1, "extent": 1, "components": 1,
                "unchanged_outside": 1, "attributes": 0}
    assert summary["failures_by_check"] == {name: count + (name in piece.failed_checks)
                                            for name, count in designed.items()}
    assert (summary["lesions"], summary["passed"], summary["outputs"], summary["outputs_passed"]) == (7, 1, 6, 1)


def lesion_mean_gap(lesion):
    """Interior minus whole-lesion mean: what the gate's HU check sees beyond the report's whole-lesion mean."""
    return lesion.interior_mean_hu - lesion.mean_hu


def _set(array, index, value):
    array[index] = value
    return array


def test_two_lesions_in_one_output_are_measured_separately(tmp_path):
    exp_dir, manifest = phantom_experiment(tmp_path, n=1)
    case = exp_dir / "case_000"
    first = read_label(case / "samples_0.nii.gz")[0] == 2
    organ = read_label(case / "totalseg.nii.gz")[0] == manifest["cases"][0]["organ_id"]
    free = ndimage.binary_erosion(organ, iterations=2) & ~ndimage.binary_dilation(first, iterations=8)
    centre = np.argwhere(free)[len(np.argwhere(free)) // 2]
    second = np.zeros_like(first)
    second[tuple(slice(c - 1, c + 1) for c in centre)] = True  # 2x2x2 voxels, smaller than the cyst
    requested = float(json.loads((case / "type.json").read_text())["5"][2]["CT value"].split()[-2])
    rewrite_volume(case / "samples_0.nii.gz", lambda mask: np.where(second, 2, mask))
    rewrite_volume(case / "inpainting_0.nii.gz", lambda ct: np.where(second, requested, ct))
    first_lesion, second_lesion = evaluate_experiment(exp_dir, progress=False, plot=False)
    assert (first_lesion.lesion, first_lesion.voxels) == (0, int(first.sum()))
    assert (second_lesion.lesion, second_lesion.voxels, second_lesion.mean_hu) == (1, 8, requested)
    assert second_lesion.extent_vox == (2, 2, 2) and second_lesion.std_hu == 0.0
    assert first_lesion.components == 1 and second_lesion.box == 0  # outside the only box
    assert first_lesion.passed and second_lesion.checks["hu"] is True


def test_csv_summary_and_plot_are_written(tmp_path):
    exp_dir, _ = phantom_experiment(tmp_path, n=3)
    rewrite_volume(exp_dir / "case_001/inpainting_0.nii.gz", lambda ct: ct + 1)  # every voxel changed
    lesions = evaluate_experiment(exp_dir, progress=False)
    with open(exp_dir / "quality.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == COLUMNS and len(rows) == len(lesions) == 3
    for row, lesion in zip(rows, lesions):
        assert row["case"] == lesion.case and row["output"] == f"{lesion.case}/inpainting_0.nii.gz"
        assert float(row["mean_hu"]) == lesion.mean_hu and int(row["voxels"]) == lesion.voxels
        assert row["passed"] == str(lesion.passed).lower()
        assert row["failed_checks"] == ";".join(lesion.failed_checks)
        assert [row[f"extent_{axis}_vox"] for axis in "ijk"] == [str(v) for v in lesion.extent_vox]
    assert rows[1]["check_unchanged_outside"] == "fail" and rows[0]["check_unchanged_outside"] == "pass"
    summary = json.loads((exp_dir / "quality_summary.json").read_text())
    assert (summary["passed"], summary["failed"], summary["pass_rate"]) == (2, 1, pytest.approx(2 / 3, abs=1e-4))
    assert summary["paste_region"] == {"rim_mm": 12.0}
    plot = exp_dir / "quality.png"
    image = imread(plot)
    assert image.shape[0] > 300 and image.shape[1] > 600 and plot.stat().st_size < 200_000
    assert _red_pixels(image).sum() > 10  # the failed lesion is drawn as a red cross


def test_cli_exit_status_and_one_line_errors(tmp_path, capsys):
    exp_dir, _ = phantom_experiment(tmp_path, n=2)
    assert main([str(exp_dir), "--no-progress", "--no-plot"]) == 0
    assert "2 lesion(s), 2 passed" in capsys.readouterr().out
    assert not (exp_dir / "quality.png").exists()
    assert main([str(exp_dir), "--no-progress", "--hu-abs", "0.01", "--fail-on-reject"]) == 1
    assert "failures by check: hu 2" in capsys.readouterr().out
    assert main([str(exp_dir), "--no-progress", "--hu-abs", "0.01", "--disable", "hu"]) == 0
    capsys.readouterr()
    assert main([str(tmp_path / "missing"), "--no-progress"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "experiment folder not found" in error
    (exp_dir / "quality.toml").write_text("[tolerances]\nhu = 1\n")
    assert main([str(exp_dir), "--no-progress"]) == 1
    assert "unknown tolerance" in capsys.readouterr().err


def test_an_unreadable_output_is_reported_and_the_others_evaluated(tmp_path, capsys):
    exp_dir, _ = phantom_experiment(tmp_path, n=3)
    (exp_dir / "case_001/inpainting_0.nii.gz").write_bytes(b"not a nifti")
    assert main([str(exp_dir), "--no-progress", "--no-plot"]) == 1
    captured = capsys.readouterr()
    assert "case_001" in captured.err and "cannot read" in captured.err
    summary = json.loads((exp_dir / "quality_summary.json").read_text())
    assert summary["lesions"] == 2 and summary["errors"][0]["case"] == "case_001"


def test_latest_run_against_every_output(tmp_path):
    exp_dir, _ = phantom_experiment(tmp_path, n=3)
    shutil.copyfile(exp_dir / "case_000/inpainting_0.nii.gz", exp_dir / "case_000/inpainting_1.nii.gz")
    report = json.loads((exp_dir / "linet_report.json").read_text())
    report["cases"][2].update(status="failed", error="no room", outputs={})
    (exp_dir / "linet_report.json").write_text(json.dumps(report))
    latest = run_evaluation(exp_dir, progress=False, plot=False)
    assert [lesion.output for lesion in latest.lesions] == ["case_000/inpainting_0.nii.gz",
                                                            "case_001/inpainting_0.nii.gz"]
    assert [(item.case_id, item.reason) for item in latest.skipped] == [("case_002", "LINet failed: no room")]
    every = run_evaluation(exp_dir, which="all", progress=False, plot=False)
    assert [lesion.output for lesion in every.lesions] == ["case_000/inpainting_0.nii.gz",
                                                           "case_000/inpainting_1.nii.gz",
                                                           "case_001/inpainting_0.nii.gz",
                                                           "case_002/inpainting_0.nii.gz"]
    (exp_dir / "linet_report.json").unlink()
    assert len(run_evaluation(exp_dir, progress=False, plot=False).lesions) == 4


def test_paste_margins_come_from_the_linet_report(tmp_path):
    exp_dir, _ = phantom_experiment(tmp_path, n=1)
    lesion = read_label(exp_dir / "case_000/samples_0.nii.gz")[0] == 2
    ring = ndimage.binary_dilation(lesion, iterations=4) & ~ndimage.binary_dilation(lesion, iterations=3)
    rewrite_volume(exp_dir / "case_000/inpainting_0.nii.gz", lambda ct: np.where(ring, ct + 5, ct))
    assert evaluate_experiment(exp_dir, progress=False, plot=False)[0].changed_outside_voxels == 0
    write_linet_report(exp_dir, ["case_000"], {"rim_mm": 6.0})
    # The paste may touch voxels closer than 6 mm = 3 voxels of 2 mm (Euclidean) to the lesion.
    outside = ring & (ndimage.distance_transform_edt(~lesion) >= 3)
    assert 0 < outside.sum() < ring.sum()
    assert evaluate_experiment(exp_dir, progress=False, plot=False)[0].changed_outside_voxels == int(outside.sum())


def test_quality_gate_hook_moves_failing_outputs_aside(tmp_path):
    exp_dir, _ = phantom_experiment(tmp_path, n=3)
    (exp_dir / "linet_report.json").unlink()  # test.py calls the gate before writing its report
    lesion = read_label(exp_dir / "case_001/samples_0.nii.gz")[0] == 2
    rewrite_volume(exp_dir / "case_001/inpainting_0.nii.gz", lambda ct: np.where(lesion, ct - 400, ct))
    (exp_dir / "case_001/inpainting_0.png").write_bytes(b"preview")
    results = []
    for index, case in enumerate(["case_000", "case_001", "case_002"]):
        result = CaseResult(index, case, status="done", outputs={"image": str(exp_dir / case / "inpainting_0.nii.gz")})
        results.append(result)
    results[1].outputs["preview"] = str(exp_dir / "case_001/inpainting_0.png")
    results.append(CaseResult(3, "case_003", status="failed", error="no room"))
    dropped = apply_quality_gate(exp_dir, results, rim_mm=12.0, progress=False)
    assert [(item.case_id, item.moved_to) for item in dropped] == [
        ("case_001", exp_dir / "case_001/rejected/inpainting_0.nii.gz")]
    assert "hu" in dropped[0].reasons[0] and not (exp_dir / "case_001/inpainting_0.nii.gz").exists()
    assert set(results[1].outputs) == {"rejected_image", "rejected_preview"}
    assert (exp_dir / "case_001/rejected/inpainting_0.png").read_bytes() == b"preview"
    assert "quality gate: lesion 0 failed hu" in results[1].warnings[0]
    assert results[0].outputs["image"].endswith("case_000/inpainting_0.nii.gz") and not results[0].warnings
    assert len(list(csv.DictReader(open(exp_dir / "quality.csv")))) == 3
    write_run_report(exp_dir / "linet_report.json", "linet", {"rim_mm": 12.0}, results[:3])
    evaluation = run_evaluation(exp_dir, progress=False, plot=False)
    assert [item.case_id for item in evaluation.skipped] == ["case_001"]
    assert "rejected by the quality gate" in evaluation.skipped[0].reason
    moved, _ = read_volume(exp_dir / "case_001/rejected/inpainting_0.nii.gz")
    assert moved[lesion].mean() < -300
    # A later run rejecting a file of the same name keeps the earlier one.
    shutil.copyfile(exp_dir / "case_001/rejected/inpainting_0.nii.gz", exp_dir / "case_001/inpainting_0.nii.gz")
    again = CaseResult(1, "case_001", status="done", outputs={"image": str(exp_dir / "case_001/inpainting_0.nii.gz")})
    (dropped_again,) = apply_quality_gate(exp_dir, [again], progress=False)
    assert dropped_again.moved_to.name == "inpainting_0~2.nii.gz"
    assert (exp_dir / "case_001/rejected/inpainting_0.nii.gz").is_file()
