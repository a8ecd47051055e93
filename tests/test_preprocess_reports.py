"""Reports: the offline sampler's choices and the field-by-field validation of a reply."""
import json

import numpy as np
import pytest

from preprocessing.bbox import box_problem
from preprocessing.report_format import ReportError, ReportRequest, parse_ct_value, parse_size
from preprocessing.report_offline import OfflineReporter, lesion_kind
from preprocessing.report_validation import validate_reply
from ldm.data.vocabulary import canonical_value, group_index


def _organ(shape=(30, 40, 40)):
    organ = np.zeros(shape, dtype=bool)
    organ[5:25, 8:32, 6:34] = True
    return organ


def _request(organ_id=5, name="liver", hollow=False, lesion="cyst", fixed=None, organ=None, hu=60.0, boxes=1):
    organ = _organ() if organ is None else organ

    def size_problem(size_xyz, cavity):
        return box_problem(organ, tuple(size_xyz)[::-1], boxes, cavity, hollow, name)

    positions = np.argwhere(organ)
    extent = tuple(int(e) for e in (positions.max(0) - positions.min(0) + 1)[::-1])
    return ReportRequest(organ_id=organ_id, organ_name=name, hollow=hollow, lesion_type=lesion,
                         organ_extent_xyz=extent, spacing_xyz_mm=(1.0, 1.0, 1.0), fixed=dict(fixed or {}),
                         organ_mean_hu=hu, contrast_enhanced=None, size_problem=size_problem)


def _attributes(report, organ_id):
    return report[str(organ_id)][2]


def test_lesion_kinds_by_keyword():
    assert [lesion_kind(t) for t in ("Renal cyst", "kidney stone", "Calculus", "HCC", "tumour")] == \
        ["cyst", "stone", "stone", "tumour", "tumour"]


@pytest.mark.parametrize("seed", range(4))
def test_cyst_reports_are_fluid_homogeneous_and_fit(seed):
    request = _request(lesion="cyst")
    report = OfflineReporter().generate(request, np.random.default_rng(seed))
    attributes = _attributes(report, 5)
    assert group_index("density", attributes["density"].rstrip(",")) in (0, 4)
    assert attributes["density variations"] == "homogeneous,"
    assert attributes["surface characteristics"] == "well-defined margin,"
    assert 0 <= parse_ct_value(attributes["CT value"]) <= 20
    size = parse_size(attributes["size"])
    assert report["5"][3] == [[list(request.organ_extent_xyz)], [list(size)]]
    assert request.size_problem(size, attributes["cavity"]) is None
    for name in ("enhancement status", "shape", "density", "density variations", "surface characteristics",
                 "relationship with adjacent organs", "specific features"):
        assert canonical_value(name, attributes[name]) == attributes[name]
    assert report["5"][0] == attributes["shape"] and report["5"][1] == ""


def test_stone_in_a_hollow_organ_is_hyperdense_in_the_lumen():
    report = OfflineReporter().generate(_request(104, "urinary bladder", True, "bladder stone"), np.random.default_rng(0))
    attributes = _attributes(report, 104)
    assert group_index("density", attributes["density"].rstrip(",")) == 2
    assert attributes["cavity"] == "within the lumen of a hollow organ,"
    assert attributes["specific features"] in ("stone,", "calculus,")
    assert parse_ct_value(attributes["CT value"]) >= 300


def test_tumour_in_a_hollow_organ_thickens_the_wall_or_protrudes():
    seen = set()
    for seed in range(12):
        attributes = _attributes(OfflineReporter().generate(_request(6, "stomach", True, "gastric cancer"),
                                                            np.random.default_rng(seed)), 6)
        seen.add(attributes["cavity"])
        if attributes["cavity"] == "wall thickening,":
            assert attributes["shape"] in ("irregular wall thickening,", "irregular,wall thickening,", "luminal narrowing,")
        else:
            assert "protrusion into the lumen" in attributes["shape"]
        assert attributes["surface characteristics"] in ("clear serosal surface,", "serosal surface irregularity,")
    assert seen == {"wall thickening,", "within the lumen of a hollow organ,"}


def test_tumour_ct_value_follows_density_and_organ():
    for seed in range(10):
        attributes = _attributes(OfflineReporter().generate(_request(lesion="metastasis", hu=100.0),
                                                            np.random.default_rng(seed)), 5)
        group = group_index("density", attributes["density"].rstrip(","))
        hu = parse_ct_value(attributes["CT value"])
        low, high = {0: (50, 80), 1: (92, 108), 3: (75, 95)}[group]
        assert low <= hu <= high


def test_offline_is_seeded_and_user_values_win():
    request = _request(lesion="tumor", fixed={"density": "hyperdense lesion,", "cavity": "within the parenchymal organ,",
                                              "size": (5, 6, 7)})
    first = OfflineReporter().generate(request, np.random.default_rng(3))
    assert first == OfflineReporter().generate(request, np.random.default_rng(3))
    attributes = _attributes(first, 5)
    assert attributes["density"] == "hyperdense lesion," and attributes["cavity"] == "within the parenchymal organ,"
    assert attributes["size"] == "[[5 6 7]] pixel," and 80 <= parse_ct_value(attributes["CT value"]) <= 120


def test_sizes_shrink_to_fit_a_small_organ_and_fixed_sizes_that_do_not_fit_fail():
    small = np.zeros((12, 12, 12), dtype=bool)
    small[3:9, 4:8, 3:10] = True
    request = _request(lesion="tumour", organ=small)
    for seed in range(6):
        attributes = _attributes(OfflineReporter().generate(request, np.random.default_rng(seed)), 5)
        assert request.size_problem(parse_size(attributes["size"]), attributes["cavity"]) is None
    with pytest.raises(ReportError, match=r"size \[9, 9, 9\] voxels does not fit in the liver"):
        OfflineReporter().generate(_request(organ=small, fixed={"size": (9, 9, 9)}), np.random.default_rng(0))


def _reply(organ_id=5, **changes):
    attributes = {
        "enhancement status": "enhanced CT,", "lesion location": str(organ_id), "shape": "round-like,",
        "size": "[[6 7 8]] pixel,", "density": "low density lesion,", "density variations": "homogeneous,",
        "CT value": "Mean density of the lesion region is approximately 12 HU,",
        "surface characteristics": "well-defined margin,",
        "relationship with adjacent organs": "no close relationship with surrounding organs,",
        "specific features": "", "cavity": "within the parenchymal organ,",
    }
    attributes.update(changes)
    return json.dumps({str(organ_id): ["round-like,", "", attributes, [[[28, 24, 20]], [[6, 7, 8]]]]})


def test_valid_reply_becomes_the_canonical_report():
    report = validate_reply("```json\n" + _reply() + "\n```", _request())
    attributes = _attributes(report, 5)
    assert attributes["enhancement status"] == "enhanced ct," and attributes["size"] == "[[6 7 8]] pixel,"
    assert report["5"][3][1] == [[6, 7, 8]]


def test_every_problem_of_a_reply_is_listed():
    reply = _reply(density="purple lesion,", **{"CT value": "dark"})
    reply = reply.replace('"cavity": "within the parenchymal organ,"', '"cavity": "wall thickening,"')
    reply = reply.replace("[[6, 7, 8]]]", "[[60, 7, 8]]]")
    with pytest.raises(ReportError) as error:
        validate_reply(reply, _request())
    message = str(error.value)
    assert "density: 'purple lesion' is not in the vocabulary" in message
    assert "CT value: expected one number of HU" in message
    assert "cavity: 'wall thickening' is for hollow organs; for this solid organ use one of" in message
    assert "size [60, 7, 8] voxels does not fit in the liver" in message


def test_reply_structure_errors():
    for text, pattern in (("not json", "not valid JSON"), ('{"6": []}', 'top-level key must be "5"'),
                          ('{"5": "x"}', r'"5" must map to'), ("[1, 2]", "must be a JSON object")):
        with pytest.raises(ReportError, match=pattern):
            validate_reply(text, _request())


def test_user_values_override_the_reply_and_a_size_that_leaves_no_room_is_refused():
    report = validate_reply(_reply(density="purple,"), _request(fixed={"density": "isodense lesion,"}))
    assert _attributes(report, 5)["density"] == "isodense lesion,"
    with pytest.raises(ReportError, match="has room for only 1 of 2 separate boxes"):
        validate_reply(_reply().replace("[[6, 7, 8]]]", "[[26, 22, 18]]]"), _request(boxes=2))
