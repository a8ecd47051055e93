"""``prepare_dataset.py`` on bad input: each bad case fails alone with one line naming it, the good ones go on; a
folder that is not an nnU-Net dataset or undeclared label values stop the run with one line. And ``--reporter
llm``: the LLM (a local OpenAI-compatible server) only fills what the image cannot decide."""
import json
import shutil

import numpy as np
import pytest

import prepare_dataset
from ldm.data.lists import read_list
from ldm.data.synthetic_geometry import geometry_for
from ldm.data.volume import read_label, write_volume
from tests.prepare_builders import LIVER, SHAPE, SPACING, make_case, write_dataset_json
from tests.test_preprocess_llm import ChatServer

REASONS = {"nolabel": "has no label", "noimage": "has no image", "nolesion": "has no lesion voxel",
           "grid": "another voxel grid"}


@pytest.fixture(scope="module")
def one_case(tmp_path_factory):
    """A dataset folder with one good phantom case and its v1 segmentation folder."""
    base = tmp_path_factory.mktemp("inputs")
    dataset, segs = base / "Dataset902_Inputs", base / "segs"
    segs.mkdir()
    known = make_case(dataset, "good", 0, -40, seg_dir=segs)
    write_dataset_json(dataset, 1)
    return dataset, segs, known


def run(capsys, *argv):
    code = prepare_dataset.main([str(a) for a in argv] + ["--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def test_each_bad_case_fails_alone_with_one_line(one_case, tmp_path, capsys):
    source, segs, _ = one_case
    dataset = tmp_path / "Dataset903_Bad"
    shutil.copytree(source, dataset)
    image, label, seg = (dataset / "imagesTr" / "good_0000.nii.gz", dataset / "labelsTr" / "good.nii.gz",
                         segs / "good.nii.gz")
    shutil.copy(image, dataset / "imagesTr" / "nolabel_0000.nii.gz")
    shutil.copy(label, dataset / "labelsTr" / "noimage.nii.gz")
    values, geometry = read_label(label)
    for case in ("nolesion", "grid"):
        shutil.copy(image, dataset / "imagesTr" / f"{case}_0000.nii.gz")
    write_volume(dataset / "labelsTr" / "nolesion.nii.gz", np.where(values == 2, 1, values), geometry, np.uint8)
    coarse = geometry_for([s // 2 for s in SHAPE], (2 * SPACING,) * 3, ("L", "P", "S"))
    write_volume(dataset / "labelsTr" / "grid.nii.gz", values[::2, ::2, ::2], coarse, np.uint8)
    seg_dir = tmp_path / "segs"
    seg_dir.mkdir()
    for case in ("good", "nolabel", "noimage", "nolesion", "grid"):
        shutil.copy(seg, seg_dir / f"{case}.nii.gz")
    before = {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    code, stdout, errors = run(capsys, dataset, out, "--organ", "liver", "--lesion-label", 2, "--organ-label", 1,
                               "--seg-dir", seg_dir, "--spacing", SPACING, "--val-fraction", 0)
    assert code == 1
    assert "5 case(s): 1 done, 0 skipped, 4 failed" in stdout
    assert len(errors) == len(REASONS)
    for case, reason in REASONS.items():
        line = next(line for line in errors if line.startswith(f"FAILED case {case}:"))
        assert reason in line, line
    assert [p.split("/")[-2] for p in read_list(out / "train_image_list.txt")] == ["good"]
    assert read_list(out / "val_image_list.txt") == []
    report = json.loads((out / "prepare_report.json").read_text())
    assert [c["status"] for c in report["cases"]] == ["done", "failed", "failed", "failed", "failed"]
    assert {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()} == before


def test_a_folder_without_dataset_json_stops_with_one_line(one_case, tmp_path, capsys):
    source, segs, _ = one_case
    dataset = tmp_path / "NotADataset"
    shutil.copytree(source, dataset)
    (dataset / "dataset.json").unlink()
    code, _, errors = run(capsys, dataset, tmp_path / "out", "--organ", "liver", "--lesion-label", 2,
                          "--seg-dir", segs)
    assert code == 1 and len(errors) == 1
    assert str(dataset) in errors[0] and "no dataset.json" in errors[0]


def test_undeclared_label_values_and_unknown_organs_stop_with_one_line(one_case, tmp_path, capsys):
    dataset, segs, _ = one_case
    code, _, errors = run(capsys, dataset, tmp_path / "out", "--organ", "liver", "--lesion-label", 7,
                          "--seg-dir", segs)
    assert code == 1 and len(errors) == 1 and "--lesion-label 7" in errors[0] and "tumor=2" in errors[0]
    code, _, errors = run(capsys, dataset, tmp_path / "out", "--organ", "livr", "--lesion-label", 2,
                          "--seg-dir", segs)
    assert code == 1 and len(errors) == 1 and "'liver'" in errors[0]
    assert not (tmp_path / "out").exists()


def test_llm_fills_only_what_the_image_cannot_decide(one_case, tmp_path, capsys):
    dataset, segs, known = one_case
    reply = {str(LIVER): ["irregular,", "", {"specific features": "spiculated margins,",
                                             "density": "isodense lesion,", "shape": "irregular,"},
                          [[[1, 1, 1]], [[1, 1, 1]]]]}
    with ChatServer() as server:
        server.replies = ["not json", json.dumps(reply)]
        code, _, errors = run(capsys, dataset, tmp_path / "out", "--organ", "liver", "--lesion-label", 2,
                              "--organ-label", 1, "--seg-dir", segs, "--spacing", SPACING, "--reporter", "llm",
                              "--llm-base-url", server.url, "--llm-model", "local")
    assert code == 0, errors
    report = json.loads((tmp_path / "out" / "cases" / "good" / "type.json").read_text())
    attributes = report[str(LIVER)][2]
    assert attributes["specific features"] == "spiculated margins,"
    assert attributes["density"] in ("hypodense lesion,", "hypodense fluid-like lesion,")
    assert attributes["shape"] == report[str(LIVER)][0] == "round-like,"
    assert attributes["size"] == f"[[{' '.join(map(str, known.size_vox))}]] pixel,"
    assert len(server.requests) == 2
    prompt = server.requests[0]["messages"][1]["content"]
    assert attributes["density"] in prompt and '"size": [' in prompt
    assert "specific features" not in prompt.split("given by the user:")[1].split("\n")[0]
