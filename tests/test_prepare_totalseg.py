"""``prepare_dataset.py`` on the real abdominal CT of ``../shared/data/totalseg-example`` with lesions inserted in
its liver (hypo- and hyperdense): the reports state the inserted box, HU and density; the organ comes from the
real TotalSegmentator v2 segmentation (``--seg-dir --seg-version v2``, no organ label in the dataset)."""
import json
import shutil

import pytest

import prepare_dataset
from ldm.lesion.compare import density_class
from tests.prepare_builders import LIVER, make_example_ct_case, write_dataset_json

OFFSETS = {"ct_hypo": -50.0, "ct_hyper": 45.0}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from conftest import TOTALSEG_EXAMPLE, require_shared

    example = require_shared(TOTALSEG_EXAMPLE)
    base = tmp_path_factory.mktemp("totalseg_prepare")
    dataset, segs, out = base / "Dataset904_ExampleCT", base / "segs", base / "out"
    segs.mkdir()
    known = {}
    for seed, (case_id, offset) in enumerate(OFFSETS.items()):
        known[case_id] = make_example_ct_case(dataset, case_id, example / "example_ct_sm.nii.gz",
                                              example / "example_seg.nii.gz", offset, seed=seed)
        shutil.copy(example / "example_seg.nii.gz", segs / f"{case_id}.nii.gz")
    write_dataset_json(dataset, len(known), {"background": 0, "lesion": 1})
    code = prepare_dataset.main([str(dataset), str(out), "--organ", "liver", "--lesion-label", "1", "--seg-dir",
                                 str(segs), "--seg-version", "v2", "--spacing", "3", "--no-progress"])
    assert code == 0
    report = json.loads((out / "prepare_report.json").read_text())
    return known, {case["case_id"]: case for case in report["cases"]}


def test_reports_state_the_inserted_lesions(prepared):
    known, cases = prepared
    for case_id, lesion in known.items():
        case = cases[case_id]
        assert case["status"] == "done", case["error"]
        entry = json.loads(open(case["outputs"]["type"]).read())[str(LIVER)]
        attributes = entry[2]
        assert tuple(entry[3][1][0]) == lesion.size_vox
        assert attributes["size"] == f"[[{' '.join(map(str, lesion.size_vox))}]] pixel,"
        hu = int(attributes["CT value"].split("approximately ")[1].split()[0])
        assert abs(hu - (lesion.organ_hu + lesion.offset_hu)) <= 3
        assert density_class(attributes["density"], lung=False) == ("hypo" if lesion.offset_hu < 0 else "hyper")
        assert abs(case["lesion"]["organ_reference_hu"] - lesion.organ_hu) <= 10
        assert attributes["cavity"] == "within the parenchymal organ,"
        assert attributes["density variations"] == "homogeneous,"
        assert attributes["shape"] == "round-like,"
        # The example CT is a non-contrast scan: its aorta measures about 42 HU.
        assert attributes["enhancement status"] == "non-contrast ct," and case["lesion"]["aorta_hu"] < 100
