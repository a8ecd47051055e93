"""Report sizes are bounded by what the inference crops hold (with the blend rim), for both reporters and the
user's fixed size; the LLM prompt states the bound."""
import dataclasses
import json

import numpy as np
import pytest
from test_preprocess_reports import _request

from inference.preflight import capacity_xyz, capacity_zyx
from preprocessing.report_format import ReportError, size_bound_problem
from preprocessing.report_llm import build_prompt
from preprocessing.report_offline import OfflineReporter
from preprocessing.report_validation import validate_reply


def bounded(request, bound):
    """``request`` with the crop bound added to its size check, as preprocess.py builds it."""
    inner = request.size_problem
    return dataclasses.replace(request, max_size_xyz=bound,
                               size_problem=lambda size, cavity: size_bound_problem(size, bound) or inner(size, cavity))


def test_capacity_is_the_smaller_crop_less_the_rim_at_the_working_spacing():
    # Release crops at 1 mm: LMNet 64 x 152 x 152, LINet 128^3 less 2 voxels of rim on each side.
    assert capacity_xyz((1.0, 1.0, 1.0)) == (124, 124, 64)
    # Demo crops (32 x 64 x 64 for both) at 1 mm and at 3 mm (the 2 mm rim is one voxel there).
    assert capacity_zyx((32, 64, 64), (32, 64, 64), 2.0, (1.0, 1.0, 1.0)) == (28, 60, 60)
    assert capacity_zyx((32, 64, 64), (32, 64, 64), 2.0, (3.0, 3.0, 3.0)) == (30, 62, 62)
    assert capacity_xyz((0.8, 0.8, 2.5), (32, 64, 64), (32, 64, 64), 2.0) == (58, 58, 30)


@pytest.mark.parametrize("seed", range(6))
def test_offline_sizes_stay_within_the_bound(seed):
    request = bounded(_request(lesion="cyst"), (6, 5, 4))
    report = OfflineReporter().generate(request, np.random.default_rng(seed))
    size = report["5"][3][1][0]
    assert all(s <= b for s, b in zip(size, (6, 5, 4)))


def test_fixed_size_beyond_the_bound_is_refused_and_the_llm_is_told():
    request = bounded(_request(fixed={"size": (9, 4, 4)}), (6, 5, 4))
    with pytest.raises(ReportError, match=r"the fixed size \[9, 4, 4\]: larger than \[6, 5, 4\] voxels"):
        OfflineReporter().generate(request, np.random.default_rng(0))
    prompt = build_prompt(bounded(_request(), (6, 5, 4)))
    assert "not larger than [6, 5, 4] (X, Y, Z: the largest lesion the synthesis models can hold" in prompt
    good = OfflineReporter().generate(bounded(_request(), (6, 5, 4)), np.random.default_rng(1))
    too_large = dict(good)
    entry = list(too_large["5"])
    entry[3] = [entry[3][0], [[9, 4, 4]]]
    entry[2] = {**entry[2], "size": "[[9 4 4]] pixel,"}
    too_large["5"] = entry
    with pytest.raises(ReportError, match=r"size \[9, 4, 4\]: larger than \[6, 5, 4\]"):
        validate_reply(json.dumps(too_large), bounded(_request(), (6, 5, 4)))
