"""compare_segmentation.py on hand-built predictions: lesion-wise counts (a missed lesion, a split lesion, a false
positive, touching lesions), size bins in mm, Dice, the paired bootstrap, the files written and bad input."""
from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from compare_segmentation import main
from experiments.compare import compare_predictions, summarise
from experiments.lesions import score_case, size_bin
from ldm.errors import ConfigError

SHAPE = (32, 32, 32)


def cube(start, size, shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def write_label(path, mask_or_labels, spacing=(1.0, 1.0, 1.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = mask_or_labels.astype(np.uint8) * 2 if mask_or_labels.dtype == bool else mask_or_labels
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.diag([*spacing, 1.0])), str(path))


def test_a_missed_lesion_halves_the_sensitivity_and_sizes_come_from_the_spacing():
    big, small = cube((2, 2, 2), 10), cube((20, 20, 20), 4)  # 1000 and 64 voxels
    score = score_case(big, big | small, (1.0, 1.0, 1.0))
    assert score.lesions == {"<10 mm": 1, "10-20 mm": 1, ">20 mm": 0}
    assert score.found == {"<10 mm": 0, "10-20 mm": 1, ">20 mm": 0}
    assert sum(score.false_positives.values()) == 0
    assert score.dice == pytest.approx(2 * 1000 / (1000 + 1064))
    assert score.diameters_mm[0] == pytest.approx((6 * 1000 / math.pi) ** (1 / 3), abs=0.01)
    coarse = score_case(big, big | small, (2.0, 2.0, 2.0))  # 8 mm^3 voxels: 9.9 mm and 24.8 mm
    assert coarse.lesions == {"<10 mm": 1, "10-20 mm": 0, ">20 mm": 1}
    assert [size_bin(d) for d in (9.99, 10.0, 20.0, 20.01)] == ["<10 mm", "10-20 mm", "10-20 mm", ">20 mm"]


def test_a_lesion_predicted_in_pieces_is_found_once_with_no_false_positive():
    reference = cube((4, 4, 4), 10)
    prediction = reference.copy()
    prediction[8:10] = False  # two predicted components inside one lesion
    score = score_case(prediction, reference, (1.0, 1.0, 1.0))
    assert sum(score.lesions.values()) == 1 and sum(score.found.values()) == 1
    assert sum(score.false_positives.values()) == 0


def test_a_prediction_away_from_every_lesion_is_one_false_positive_of_its_own_size():
    reference = cube((4, 4, 4), 10)
    prediction = reference | cube((24, 24, 24), 3) | cube((24, 2, 2), 6)
    score = score_case(prediction, reference, (1.0, 1.0, 1.0))
    assert score.found["10-20 mm"] == 1
    assert score.false_positives == {"<10 mm": 2, "10-20 mm": 0, ">20 mm": 0}  # 3.7 mm and 7.4 mm


def test_touching_lesions():
    face = cube((4, 4, 4), 4) | cube((8, 4, 4), 4)  # share a face: one lesion
    score = score_case(face, face, (1.0, 1.0, 1.0))
    assert sum(score.lesions.values()) == 1 and sum(score.found.values()) == 1
    corner = cube((4, 4, 4), 4) | cube((8, 8, 8), 4)  # meet at one corner only: two lesions
    bridge = cube((4, 4, 4), 8)  # one predicted component over both
    score = score_case(bridge, corner, (1.0, 1.0, 1.0))
    assert sum(score.lesions.values()) == 2 and sum(score.found.values()) == 2
    assert sum(score.false_positives.values()) == 0


def test_the_overlap_rule():
    reference = cube((4, 4, 4), 10)
    sliver = np.zeros(SHAPE, dtype=bool)
    sliver[4, 4:14, 4:9] = True  # 50 of 1000 voxels: 5 %
    assert sum(score_case(sliver, reference, (1, 1, 1)).found.values()) == 0
    assert sum(score_case(sliver, reference, (1, 1, 1), min_overlap=0.05).found.values()) == 1
    assert score_case(np.zeros(SHAPE, bool), np.zeros(SHAPE, bool), (1, 1, 1)).dice == 1.0


def _folders(tmp_path, cases: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]):
    for name, (reference, baseline, augmented) in cases.items():
        for folder, mask in (("labels", reference), ("baseline", baseline), ("augmented", augmented)):
            write_label(tmp_path / folder / f"{name}.nii.gz", mask)
    return tmp_path / "baseline", tmp_path / "augmented", tmp_path / "labels"


def _experiment_cases():
    big, small = cube((2, 2, 2), 10), cube((20, 20, 20), 4)
    return {"case_a": (big | small, big, big | small),  # the augmented model finds the small lesion
            "case_b": (big, big | cube((24, 24, 24), 3), big),  # the baseline has a false positive
            "case_c": (small, small, small)}


def test_summary_values_and_paired_bootstrap(tmp_path):
    comparison = compare_predictions(*_folders(tmp_path, _experiment_cases()), bootstrap=500, seed=3)
    rows = {row["metric"]: row for row in comparison.summary}
    assert [case.case for case in comparison.cases] == ["case_a", "case_b", "case_c"] and not comparison.errors
    assert rows["sensitivity"]["baseline"] == pytest.approx(3 / 4) and rows["sensitivity"]["augmented"] == 1.0
    assert rows["sensitivity"]["lesions"] == 4 and rows["sensitivity <10 mm"]["difference"] == pytest.approx(0.5)
    assert rows["fp_per_case"]["baseline"] == pytest.approx(1 / 3) and rows["fp_per_case"]["augmented"] == 0.0
    assert rows["sensitivity >20 mm"]["baseline"] is None and rows["sensitivity >20 mm"]["ci_low"] is None
    dice_b = [2 * 1000 / 2064, 2 * 1000 / 2027, 1.0]
    assert rows["dice"]["baseline"] == pytest.approx(np.mean(dice_b))
    for row in comparison.summary:
        if row["difference"] is not None:
            assert row["ci_low"] <= row["difference"] + 1e-12 and row["difference"] <= row["ci_high"] + 1e-12
    again = summarise(comparison.cases, bootstrap=500, seed=3)
    assert again == comparison.summary
    same = {"case_a": (cube((2, 2, 2), 10),) * 3, "case_b": (cube((3, 3, 3), 10), cube((3, 3, 3), 9),
                                                             cube((3, 3, 3), 9))}
    equal = compare_predictions(*_folders(tmp_path / "equal", same), bootstrap=200)
    assert all(row["ci_low"] == row["ci_high"] == 0.0 for row in equal.summary if row["difference"] is not None)


def test_the_command_prints_the_table_and_writes_json_csv_and_png(tmp_path, capsys):
    baseline, augmented, labels = _folders(tmp_path, _experiment_cases())
    out = tmp_path / "out" / "cmp.json"
    assert main([str(baseline), str(augmented), str(labels), "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "sensitivity <10 mm" in printed and "3 case(s); lesion label 2" in printed
    saved = json.loads(out.read_text())
    assert [case["case"] for case in saved["cases"]] == ["case_a", "case_b", "case_c"]
    with open(tmp_path / "out" / "cmp.csv") as handle:
        summary = list(csv.DictReader(handle))
    assert summary[0]["metric"] == "dice" and float(summary[1]["augmented"]) == 1.0
    with open(tmp_path / "out" / "cmp_cases.csv") as handle:
        per_case = {row["case"]: row for row in csv.DictReader(handle)}
    assert per_case["case_b"]["fp_baseline"] == "1" and per_case["case_a"]["found_augmented"] == "2"
    assert (tmp_path / "out" / "cmp.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_cases_are_named_one_line_each_and_the_others_compared(tmp_path, capsys):
    baseline, augmented, labels = _folders(tmp_path, _experiment_cases())
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1, "lesion": 2}}))
    write_label(baseline / "case_grid.nii.gz", cube((1, 1, 1), 4, shape=(32, 32, 30)))
    write_label(augmented / "case_grid.nii.gz", cube((1, 1, 1), 4))
    write_label(labels / "case_grid.nii.gz", cube((1, 1, 1), 4))
    write_label(baseline / "case_absent.nii.gz", cube((1, 1, 1), 4))
    write_label(labels / "case_absent.nii.gz", cube((1, 1, 1), 4))
    odd = cube((1, 1, 1), 4).astype(np.uint8) * 7
    write_label(baseline / "case_value.nii.gz", cube((1, 1, 1), 4))
    write_label(augmented / "case_value.nii.gz", odd)
    write_label(labels / "case_value.nii.gz", cube((1, 1, 1), 4))
    out = tmp_path / "cmp.json"
    assert main([str(baseline), str(augmented), str(labels), "--json", str(out), "--no-progress"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and errors[-1].endswith("3 case(s) not compared: case_absent, case_grid, case_value")
    assert errors[0].startswith("compare_segmentation.py: case_absent: missing from the augmented folder")
    assert "case_grid:" in errors[1] and "differs from the reference label" in errors[1]
    assert "case_value:" in errors[2] and "label value(s) [7] are not in the labels [0, 1, 2]" in errors[2]
    assert len(json.loads(out.read_text())["cases"]) == 3
    with pytest.raises(ConfigError, match="--lesion-label 5"):
        compare_predictions(baseline, augmented, labels, lesion_label=5)
    assert main([str(baseline), str(tmp_path / "nowhere"), str(labels), "--json", str(out)]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0
