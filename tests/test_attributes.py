"""Reports -> attribute dicts: validation, organ-key choice, cavity (report value vs rule), LMNet/LINet texts."""
import json

import numpy as np
import pytest

from ldm.data.attributes import (CAVITY_PHRASES, cavity_from_rule, linet_attributes, lmnet_attributes, normalise_cavity,
                                 organ_mask, read_report, report_attributes, resolve_cavity, select_organ_key,
                                 shell_fraction_in_organ, short_ct_value, validate_report)
from ldm.errors import DataError

LUMEN, WALL, WITHIN, PROTRUDING = CAVITY_PHRASES


def entry(**attributes):
    return ["shape,", "", dict(attributes), [[[1, 2, 3]], [[4, 5, 6]]]]


def test_upstream_reports_give_the_documented_texts(upstream_demo):
    liver = read_report(upstream_demo / "Liver_cancer" / "type.json")
    assert list(liver) == ["5"]
    linet = linet_attributes(report_attributes(liver, "5"), "5")
    # The 9-token LINet context of the original for this report (reference §2.7), in order.
    assert list(linet.values()) == [
        "enhanced CT,", "liver", "irregular,", "low density lesion,", "heterogeneous,", "57.0 HU,",
        "ill-defined margin,",
        "no close relationship with surrounding organs,",
        "presence of increased density areas,presence of decreased density areas,",
    ]
    bladder = read_report(upstream_demo / "Bladder_cancer" / "type.json")
    lmnet = lmnet_attributes(report_attributes(bladder, "104"), "104", WALL)
    assert lmnet == {
        "enhancement status": "enhanced CT,", "lesion location": "urinary bladder",
        "shape": "round-like,protrusion into the lumen,", "surface characteristics": "serosal surface irregularity,",
        "relationship with adjacent organs": "no close relationship with surrounding organs,", "cavity": WALL,
    }
    assert list(lmnet)[-1] == "cavity" and list(lmnet)[1] == "lesion location"
    assert linet_attributes(report_attributes(bladder, "104"), "104")["CT value"] == "35.0 HU,"
    assert report_attributes(bladder, "104")["lesion location"] == "104", "the report itself must not be modified"


def test_lmnet_keeps_non_empty_specific_features_and_moves_report_cavity_last():
    attributes = {"cavity": "wall thickening,", "shape": "round-like,", "specific features": "stone,",
                  "density": "hyperdense lesion,", "CT value": "approximately 300 HU,"}
    text = lmnet_attributes(attributes, 104, WALL)
    assert list(text) == ["shape", "specific features", "lesion location", "cavity"]


def test_linet_drops_cavity_and_accepts_short_ct_value():
    text = linet_attributes({"lesion location": "5", "CT value": "57 HU,", "cavity": "x", "size": [1, 2, 3]}, 5)
    assert text == {"lesion location": "liver", "CT value": "57.0 HU,"}
    assert short_ct_value("Mean density is approximately -12.5 HU,") == "-12.5 HU,"
    with pytest.raises(DataError, match="r.json: 'CT value' 'dense' holds no"):
        short_ct_value("dense", source="r.json")


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "non-empty JSON object"),
    ('{"999": ["", "", {}]}', "'999' is not a TotalSegmentator v1 organ id"),
    ('{"liver": ["", "", {}]}', "'liver' is not"),
    ('{"5": ["", ""]}', r"report\['5'\] must be a list whose element \[2\]"),
    ('{"5": ["", "", {"shape": 3}]}', r"\['shape'\] must be a string"),
])
def test_malformed_reports_name_the_file(tmp_path, content, message):
    path = tmp_path / "broken_type.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        read_report(path)
    assert str(error.value).startswith(str(path))
    with pytest.raises(DataError, match="report file not found"):
        read_report(tmp_path / "absent.json")


def test_organ_key_choice():
    segmentation = np.zeros((4, 4, 4), np.int16)
    segmentation[:, :2] = 5          # liver: 32 voxels
    segmentation[:, 2:, :2] = 3      # kidney left: 16 voxels
    lesion = np.zeros_like(segmentation, dtype=bool)
    report = {"5": entry(), "3": entry()}
    assert select_organ_key({"3": entry()}, lesion, segmentation) == "3"
    lesion[0, 3, 0] = True           # in the kidney
    assert select_organ_key(report, lesion, segmentation) == "3"
    lesion[:, 0, 0] = True           # 4 voxels in the liver beat 1 in the kidney
    assert select_organ_key(report, lesion, segmentation) == "5"
    nowhere = np.zeros_like(lesion)
    nowhere[0, 3, 3] = True          # background: no overlap, the larger organ wins
    assert select_organ_key({"3": entry(), "5": entry()}, nowhere, segmentation) == "5"
    assert select_organ_key({"1": entry(), "2": entry()}, nowhere, segmentation) == "1", "full tie: report order"
    assert select_organ_key({"3": entry(), "5": entry()}) == "3", "no segmentation: first key"


def test_lung_organ_mask_is_union_of_report_lobes():
    segmentation = np.arange(10, 20, dtype=np.int16).reshape(10, 1, 1)
    report = validate_report({"13": entry(), "14": entry(), "5": entry()})
    mask = organ_mask(segmentation, report, "13")
    assert mask[:, 0, 0].tolist() == [v in (13, 14) for v in range(10, 20)]
    assert organ_mask(segmentation, report, "5").sum() == 0


def test_cavity_normalisation():
    assert normalise_cavity("Within the parenchymal organ") == WITHIN
    assert normalise_cavity("  wall   thickening, ") == WALL
    with pytest.raises(DataError, match="r.json: cavity 'inside'"):
        normalise_cavity("inside", source="r.json")


def test_shell_fraction_and_solid_rule():
    lesion = np.zeros((5, 5, 5), bool)
    lesion[2, 2, 2] = True
    organ = np.zeros_like(lesion)
    organ[1:4, 2, 2] = True          # 2 of the 6 face neighbours
    assert shell_fraction_in_organ(lesion, organ) == pytest.approx(2 / 6)
    organ[2, 1:4, 1:4] = True        # + 4 in-plane neighbours -> all 6
    assert shell_fraction_in_organ(lesion, organ) == 1.0
    edge = np.zeros_like(lesion)
    edge[0, 2, 2] = True             # neighbours outside the array are not counted: 5 remain
    assert shell_fraction_in_organ(edge, np.ones_like(edge)) == 1.0
    assert cavity_from_rule(5, {}, lesion, organ) == WITHIN
    organ[2, 1, 2] = False           # 5/6 = 0.83 < 0.9
    assert cavity_from_rule(5, {}, lesion, organ) == PROTRUDING
    other_lesion = np.zeros_like(lesion)
    other_lesion[2, 1, 2] = True     # a neighbouring lesion voxel counts as inside
    assert cavity_from_rule(5, {}, lesion, organ, all_lesions=other_lesion | lesion) == WITHIN


def test_hollow_rule_and_report_value_wins():
    lesion = np.zeros((3, 3, 3), bool)
    lesion[1, 1, 1] = True
    empty = np.zeros_like(lesion)
    assert cavity_from_rule(104, {"specific features": "Calculus,"}, lesion, empty) == LUMEN
    assert cavity_from_rule("104", {"shape": "round-like,"}, lesion, empty) == WALL
    assert resolve_cavity(5, {"cavity": "Within the parenchymal organ"}, lesion, empty) == WITHIN
    assert resolve_cavity(5, {"cavity": ""}, lesion, empty) == PROTRUDING
    text = lmnet_attributes({"cavity": "x"}, 5, LUMEN)
    assert json.dumps(text) == json.dumps({"lesion location": "liver", "cavity": LUMEN})
