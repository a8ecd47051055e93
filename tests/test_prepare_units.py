"""The pieces of ``prepare_dataset``: the seeded split, shape measures against hand-counted values, measurements
of a noiseless lesion, the phrase thresholds, and the dataset reader's handling of nnU-Net folders."""
import json
from dataclasses import replace

import numpy as np
import pytest

from ldm.errors import ConfigError, DataError
from ldm.lesion import DEFAULT
from ldm.lesion.measure import elongation, measure_lesion, solidity
from ldm.lesion.phrases import measured_phrases
from preparation.outputs import fragment, split_cases
from preparation.source import read_dataset
from ldm.data.vocabulary import canonical_value

LIVER, KIDNEY_LEFT, BLADDER, AORTA = 5, 3, 104, 7


def ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)):
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing)], indexing="ij")
    return sum(g ** 2 for g in grids) <= radius ** 2


def test_split_is_seeded_by_case_and_independent_of_order():
    ids = [f"case_{i:02d}" for i in range(10)]
    split = split_cases(ids, 0.2, seed=0)
    assert split == split_cases(list(reversed(ids)), 0.2, seed=0)
    assert sorted(split) == ids and list(split.values()).count("val") == 2
    assert any(split_cases(ids, 0.2, seed=s) != split for s in range(1, 5))
    assert list(split_cases(ids[:3], 0.05, seed=0).values()).count("val") == 1
    assert set(split_cases(ids, 0.0, seed=0).values()) == {"train"}
    assert split_cases(ids[:1], 0.5, seed=0) == {"case_00": "train"}


def test_fragment_removes_a_split_without_cases(tmp_path):
    block = fragment(tmp_path, ("image", "label"), ["train"])["data"]["params"]
    assert block["validation"] is None
    assert block["train"]["params"]["image_list"] == str(tmp_path.resolve() / "train_image_list.txt")


def test_solidity_and_elongation_against_hand_counts():
    assert solidity(ball((15, 15, 15), (7, 7, 7), 5.5)) == 1.0
    cube = np.ones((3, 3, 3), dtype=bool)
    cube[1:, 1:, 1:] = False  # the hull of the remaining centres keeps (1,1,1) and the three (2,1,1)-like centres
    assert solidity(cube) == pytest.approx(19 / 23)
    assert solidity(np.ones((4, 4, 1), dtype=bool)) is None
    quarter_cut = ball((41, 41, 41), (20, 20, 20), 18)
    quarter_cut[20:, 20:, :] = False
    assert 0.75 < solidity(quarter_cut) < DEFAULT.round_solidity
    assert elongation(ball((21, 21, 21), (10, 10, 10), 8), (1, 1, 1)) == pytest.approx(1.0, abs=0.02)
    rod = np.zeros((10, 10, 40), dtype=bool)
    rod[4:6, 4:6, :] = True
    # n voxels in a row: positions vary by (n^2 - 1) / 12, plus a voxel's own 1 / 12: n^2 / 12 in all.
    assert elongation(rod, (1, 1, 1)) == pytest.approx(np.sqrt((40 ** 2) / 2 ** 2), rel=1e-6)


def test_a_noiseless_lesion_is_measured_exactly():
    shape = (40, 40, 40)
    organ = ball(shape, (20, 20, 20), 16)
    lesion = ball(shape, (20, 20, 20), 5) & organ
    ct = np.where(organ, 60.0, -100.0)
    ct[lesion] = 30.0
    segmentation = np.where(organ, LIVER, 0).astype(np.int16)
    segmentation[:, :3, :3] = AORTA  # 40*9 voxels of aorta at 200 HU
    ct[:, :3, :3] = 200.0
    m = measure_lesion(ct, lesion, lesion, organ & ~lesion, segmentation, LIVER, (1.0, 1.0, 1.0))
    assert m.size_vox == (11, 11, 11) and m.box_start_vox == (15, 15, 15) and m.voxels == int(lesion.sum())
    assert m.mean_hu == m.interior_mean_hu == 30.0 and m.organ_reference_hu == 60.0 and m.contrast_hu == -30.0
    assert m.organ_noise_hu == 0.0 and m.interior_std_hu == 0.0 and m.margin_leak == 0.0
    assert m.shell_in_organ == 1.0 and m.aorta_hu == 200.0 and m.nearest_other_organ_mm is None
    phrases = measured_phrases(m, LIVER)
    assert phrases.values["enhancement status"] == "enhanced ct," and phrases.values["shape"] == "round-like,"
    assert phrases.values["density"] == "hypodense lesion," and phrases.values["cavity"] == "within the parenchymal organ,"
    assert phrases.undecided == ["specific features"]
    blurred = ct.copy()
    rim = ball(shape, (20, 20, 20), 6.5) & ~lesion
    blurred[rim] = 60.0 - 0.7 * 30.0
    m_blurred = measure_lesion(blurred, lesion, lesion, organ & ~lesion, segmentation, LIVER, (1, 1, 1))
    assert m_blurred.margin_leak == pytest.approx(0.7)
    assert measured_phrases(m_blurred, LIVER).values["surface characteristics"] == "ill-defined margin,"


def test_phrase_thresholds_and_organ_wording():
    organ = ball((30, 30, 30), (15, 15, 15), 12)
    lesion = ball((30, 30, 30), (15, 15, 15), 4)
    ct = np.where(lesion, 50.0, 50.0)
    base = measure_lesion(ct, lesion, lesion, organ & ~lesion, np.where(organ, LIVER, 0), LIVER, (1, 1, 1))
    densities = {-25.0: "hypodense lesion,", -5.0: "isodense lesion,", 5.0: "isodense lesion,", 25.0: "hyperdense lesion,"}
    for contrast, phrase in densities.items():
        m = replace(base, contrast_hu=contrast, interior_mean_hu=50.0 + contrast)
        assert measured_phrases(m, LIVER).values["density"] == phrase
    mixed = replace(base, below_fraction=0.3, above_fraction=0.3)
    assert measured_phrases(mixed, LIVER).values["density"] == "mixed-density lesion,"
    fluid = replace(base, contrast_hu=-40.0, interior_mean_hu=10.0)
    assert measured_phrases(fluid, LIVER).values["density"] == "hypodense fluid-like lesion,"
    assert "surface characteristics" in measured_phrases(base, LIVER).undecided  # isodense: no margin to see
    kidney = replace(base, contrast_hu=-40.0, margin_leak=0.6)
    assert measured_phrases(kidney, KIDNEY_LEFT).values["surface characteristics"] == \
        "unclear boundary with the renal parenchyma,"
    in_lumen = measured_phrases(replace(base, lumen_fraction=0.8), BLADDER).values
    on_wall = measured_phrases(replace(base, lumen_fraction=0.1), BLADDER).values
    assert (in_lumen["cavity"], in_lumen["shape"]) == ("within the lumen of a hollow organ,", "protrusion into the lumen,")
    assert (on_wall["cavity"], on_wall["shape"]) == ("wall thickening,", "irregular wall thickening,")
    for organ_id, values in ((LIVER, measured_phrases(base, LIVER).values), (BLADDER, in_lumen)):
        for name, value in values.items():
            assert canonical_value(name, value, hollow=organ_id == BLADDER) == value


def test_dataset_reader_pairs_cases_and_checks_labels(tmp_path):
    with pytest.raises(DataError, match="no dataset.json"):
        read_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "kidney": 1, "tumor": 2,
                                                                  "cyst": 3, "both": [2, 3]},
                                                       "file_ending": ".nii.gz"}))
    for path in ("imagesTr/a_0000.nii.gz", "imagesTr/a_0001.nii.gz", "labelsTr/a.nii.gz", "imagesTr/b_0000.nii.gz",
                 "labelsTr/c.nii.gz", "imagesTr/.hidden_0000.nii.gz"):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_bytes(b"")
    dataset = read_dataset(tmp_path)
    assert [case.case_id for case in dataset.cases] == ["a", "b", "c"]
    assert [case.problem is None for case in dataset.cases] == [True, False, False]
    assert dataset.label_names([2, 3]) == ["tumor", "cyst"] and "both" not in dataset.labels
    dataset.check_labels([2, 3], "--lesion-label")
    with pytest.raises(ConfigError, match="declares no such label"):
        dataset.check_labels([4], "--lesion-label")
    with pytest.raises(ConfigError, match="background"):
        dataset.check_labels([0], "--organ-label")
