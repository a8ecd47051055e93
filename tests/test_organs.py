"""Organ names and TotalSegmentator v2 -> v1 conversion."""
import numpy as np
import pytest

from ldm.data.organs import convert_v2_to_v1, is_hollow, is_lung, organ_id, organ_name, organ_names, to_v1
from ldm.data.volume import read_label
from ldm.errors import DataError


def test_names_and_ids_round_trip():
    assert len(organ_names()) == 104
    assert organ_id("liver") == 5 and organ_id("Urinary_Bladder") == 104 and organ_id("kidney left") == 3
    for key, name in organ_names().items():
        assert organ_id(name) == key
    assert organ_name(1) == "spleen"


def test_unknown_names_suggest_close_matches():
    with pytest.raises(DataError, match="did you mean 'liver'"):
        organ_id("livr")
    with pytest.raises(DataError, match="not a TotalSegmentator v1 label"):
        organ_name(300)


def test_hollow_and_lung_rules():
    assert is_hollow("urinary bladder") and is_hollow(6) and not is_hollow("liver")
    assert is_lung(13) and not is_lung("spleen")


def test_v2_to_v1_known_classes():
    v2 = np.array([0, 1, 5, 7, 21, 51, 22])  # bg, spleen, liver, pancreas, urinary bladder, heart, prostate
    np.testing.assert_array_equal(convert_v2_to_v1(v2), [0, 1, 5, 10, 104, 0, 0])
    with pytest.raises(DataError, match="unknown TotalSegmentator label version"):
        to_v1(v2, "v3")


def test_real_v2_segmentation_converts(totalseg_example):
    seg_v2, _ = read_label(totalseg_example / "example_seg.nii.gz")
    seg_v1 = to_v1(seg_v2, "v2")
    assert seg_v1.shape == seg_v2.shape and seg_v1.max() <= 104
    # The liver (v2 id 5) and the pancreas (v2 id 7 -> v1 id 10) keep their voxels.
    assert np.count_nonzero(seg_v1 == 5) == np.count_nonzero(seg_v2 == 5) > 0
    assert np.count_nonzero(seg_v1 == 10) == np.count_nonzero(seg_v2 == 7) > 0
