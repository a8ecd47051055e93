"""The one description of a lesion (:mod:`ldm.lesion`) on phantoms whose lesions are known by construction:
hypo/hyper/iso, round/lobulated/elongated, sharp and fading margins, homogeneous and two-part, inside and
protruding, next to another organ, and the lung rule; each gets the phrases it was built with, and a request of
those phrases agrees (the rest n/a with a reason), a wrong request disagrees."""
from __future__ import annotations

import numpy as np
import pytest

from ldm.data.components import ranked_components, voxel_volume_mm3
from ldm.lesion import AGREE, ATTRIBUTES, DISAGREE, NOT_APPLICABLE, Request, compare, describe_lesion
from ldm.errors import DataError
from lesion_phantoms import KNOWN, LIVER, render

BY_NAME = {known.name: known for known in KNOWN}


@pytest.mark.parametrize("known", KNOWN, ids=lambda known: known.name)
def test_each_known_lesion_gets_the_phrases_it_was_built_with(known):
    ct, lesion, seg = render(known)
    description = describe_lesion(ct, lesion, seg, (1.0, 1.0, 1.0))
    values = description.phrases.values
    assert {name: values[name] for name in known.expected} == known.expected
    m = description.measurement
    assert m.voxels == int(lesion.sum()) and m.volume_mm3 == pytest.approx(lesion.sum())
    if known.name == "protruding":
        assert 0.3 < m.inside_organ_fraction < 0.7
    else:
        assert m.inside_organ_fraction == 1.0


@pytest.mark.parametrize("known", KNOWN, ids=lambda known: known.name)
def test_a_request_of_the_built_phrases_agrees_and_the_rest_is_not_applicable_with_a_reason(known):
    ct, lesion, seg = render(known)
    description = describe_lesion(ct, lesion, seg, (1.0, 1.0, 1.0))
    m = description.measurement
    request = Request(description.organ_id, known.expected, m.size_vox, round(m.interior_mean_hu))
    verdicts = compare(request, description)
    assert [v.attribute for v in verdicts] == list(ATTRIBUTES)
    for verdict in verdicts:
        assert verdict.verdict in (AGREE, NOT_APPLICABLE), verdict
        assert (verdict.verdict == NOT_APPLICABLE) == bool(verdict.reason), verdict
    judged = {v.attribute for v in verdicts if v.verdict == AGREE}
    assert {"lesion location", "size", "CT value"} <= judged
    assert set(known.expected) - set(description.phrases.undecided) <= judged


def test_wrong_requests_disagree_attribute_by_attribute():
    ct, lesion, seg = render(BY_NAME["two-part"])
    description = describe_lesion(ct, lesion, seg, (1.0, 1.0, 1.0))
    size = description.measurement.size_vox
    wrong = Request(LIVER, {"density": "hypodense lesion,", "density variations": "homogeneous,",
                            "shape": "irregular,", "cavity": "protruding from the parenchymal organ,",
                            "relationship with adjacent organs": "close relationship with adjacent organs,",
                            "specific features": "spiculated margins,", "enhancement status": "enhanced ct,"},
                    tuple(3 * s for s in size), 200.0)
    verdicts = {v.attribute: v for v in compare(wrong, description)}
    for name in ("size", "CT value", "density", "density variations", "shape", "cavity",
                 "relationship with adjacent organs"):
        assert verdicts[name].verdict == DISAGREE, verdicts[name]
    assert verdicts["specific features"].verdict == NOT_APPLICABLE and "spiculation" in verdicts["specific features"].reason
    assert verdicts["enhancement status"].verdict == NOT_APPLICABLE and "phase" in verdicts["enhancement status"].reason
    assert compare(Request(2, {}), description)[0].verdict == DISAGREE  # requested in the kidney, lies in the liver


def test_a_mixed_lesion_is_judged_on_its_mean_unless_mixed_was_asked():
    ct, lesion, seg = render(BY_NAME["two-part"])
    description = describe_lesion(ct, lesion, seg, (1.0, 1.0, 1.0))
    asked_iso = {v.attribute: v for v in compare(Request(LIVER, {"density": "isodense lesion,"}), description)}
    assert asked_iso["density"].verdict == AGREE and "mean isodense" in asked_iso["density"].measured
    asked_hyper = {v.attribute: v for v in compare(Request(LIVER, {"density": "hyperdense lesion,"}), description)}
    assert asked_hyper["density"].verdict == DISAGREE


def test_lung_densities_follow_the_lung_rule_not_the_contrast():
    """The gate used to measure a 30 HU lesion in -850 HU lung as hyperdense and fail every such request."""
    for name, requested in (("lung soft tissue", "isodense soft tissue mass,"),
                            ("lung ground glass", "low-density ground-glass opacity,")):
        ct, lesion, seg = render(BY_NAME[name])
        description = describe_lesion(ct, lesion, seg, (1.0, 1.0, 1.0))
        assert description.measurement.contrast_hu > 200  # far above the lung: the old rule said hyper
        density = {v.attribute: v for v in compare(Request(description.organ_id, {"density": requested}),
                                                   description)}["density"]
        assert density.verdict == AGREE, density


def test_measurements_do_not_depend_on_axis_order_and_sizes_follow_the_file_axes():
    ct, lesion, seg = render(BY_NAME["elongated"])
    reference = describe_lesion(ct, lesion, seg, (1.0, 1.0, 1.0)).measurement
    flipped = tuple(np.ascontiguousarray(a.transpose(2, 1, 0)[::-1]) for a in (ct, lesion, seg))
    moved = describe_lesion(*flipped, (1.0, 1.0, 1.0), file_axes=(2, 1, 0)).measurement
    assert moved.size_vox == reference.size_vox and len(set(reference.size_vox)) > 1
    for name in ("voxels", "interior_mean_hu", "organ_reference_hu", "solidity", "elongation", "margin_leak",
                 "shell_in_organ", "nearest_other_organ_mm"):
        assert getattr(moved, name) == pytest.approx(getattr(reference, name), rel=1e-6, abs=1e-6), name


def test_voxel_volume_is_the_determinant_and_components_rank_largest_first():
    sheared = np.array([[2.0, 1.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0, 0, 0, 1.0]])
    assert voxel_volume_mm3(sheared) == pytest.approx(12.0)  # the column norms would give 2 * sqrt(5) * 3
    mask = np.zeros((6, 6, 6), dtype=bool)
    mask[0, 0, 0] = True
    mask[3:5, 3:5, 3:5] = True
    mask[0, 4, 4:6] = True
    labels, ranked, boxes = ranked_components(mask)
    assert [int((labels == r).sum()) for r in ranked] == [8, 2, 1]
    assert boxes[ranked[0] - 1] == (slice(3, 5), slice(3, 5), slice(3, 5))


def test_bad_lesion_and_organ_inputs_raise_one_clear_error():
    ct, lesion, seg = render(BY_NAME["hypo round sharp"])
    with pytest.raises(DataError, match="holds no voxel"):
        describe_lesion(ct, np.zeros_like(lesion), seg, (1.0, 1.0, 1.0))
    with pytest.raises(DataError, match="no segmented organ"):
        describe_lesion(ct, lesion, np.zeros_like(seg), (1.0, 1.0, 1.0))
    with pytest.raises(DataError, match="no stomach voxel"):
        describe_lesion(ct, lesion, seg, (1.0, 1.0, 1.0), organ_id=6)
