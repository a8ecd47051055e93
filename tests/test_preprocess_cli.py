"""`preprocess.py` end to end on the real TotalSegmentator example CT with its real v2 segmentation (--seg-list)."""
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

import preprocess
from conftest import ROOT
from ldm.data.lists import read_list

SCRIPT = ROOT / "pipeline" / "preprocess.py"
LISTS = ("img", "seg", "type", "bbox")


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_inputs(folder, rows):
    """rows: (ct path, seg path, attribute line); writes the three list files, returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "imgs.txt").write_text("".join(f"{ct}\n" for ct, _, _ in rows))
    (folder / "segs.txt").write_text("".join(f"{seg}\n" for _, seg, _ in rows))
    (folder / "attrs.txt").write_text("".join(f"{line}\n" for _, _, line in rows))
    return folder / "imgs.txt", folder / "segs.txt", folder / "attrs.txt"


def _run(imgs, exp, attrs, segs, *extra):
    return preprocess.main([str(imgs), str(exp), str(attrs), "--seg-list", str(segs), "--seg-version", "v2",
                            "--reporter", "offline", "--no-progress", *extra])


def _lists(exp):
    return {name: read_list(exp / f"{name}_list.txt") for name in LISTS}


def _check_case(img, seg, report_path, bbox, organ_id, boxes):
    ct_image, seg_image, bbox_image = (nib.load(p) for p in (img, seg, bbox))
    for image in (seg_image, bbox_image):
        assert image.shape == ct_image.shape and np.allclose(image.affine, ct_image.affine)
    labels = np.asanyarray(seg_image.dataobj)
    box = np.asanyarray(bbox_image.dataobj)
    assert bbox_image.get_data_dtype() == np.uint8 and set(np.unique(box)) == {0, 2}
    report = json.loads(Path(report_path).read_text())
    entry = report[str(organ_id)]
    size = entry[3][1][0]
    assert entry[2]["size"] == f"[[{size[0]} {size[1]} {size[2]}]] pixel,"
    assert (box == 2).sum() == boxes * np.prod(size)
    if entry[2]["cavity"] == "within the parenchymal organ,":
        assert np.all(labels[box == 2] == organ_id)
    else:
        assert np.any(labels[box == 2] == organ_id)
    positions = np.argwhere(box == 2)
    if boxes == 1:  # the box's extent along the file axes (X, Y, Z) is the report's size
        assert list(positions.max(axis=0) - positions.min(axis=0) + 1) == size
    return report


def test_full_command_from_another_directory(totalseg_example, tmp_path):
    ct, seg = totalseg_example / "example_ct_sm.nii.gz", totalseg_example / "example_seg.nii.gz"
    inputs = tmp_path / "inputs"
    _write_inputs(inputs, [(ct, seg, '{"organ type": "liver", "lesion type": "cyst"}'),
                           (ct, seg, '{"organ type": "kidney left", "lesion type": "tumor"}')])
    hashes = {path: _sha(path) for path in (ct, seg)}
    work = tmp_path / "work"
    work.mkdir()
    command = [sys.executable, str(SCRIPT), "../inputs/imgs.txt", "exp", "../inputs/attrs.txt", "--seg-list",
               "../inputs/segs.txt", "--seg-version", "v2", "--spacing", "3", "--reporter", "offline", "--seed", "3"]
    run = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "2 done, 0 skipped, 0 failed" in run.stdout
    exp = work / "exp"
    lists = _lists(exp)
    assert [len(rows) for rows in lists.values()] == [2, 2, 2, 2]
    case_dirs = {p.rsplit("/", 1)[0] for p in lists["img"]}
    for row, organ_id in enumerate((5, 3)):
        paths = [lists[name][row] for name in LISTS]
        assert len({p.rsplit("/", 1)[0] for p in paths}) == 1  # one case folder per row, aligned across lists
        _check_case(*paths, organ_id=organ_id, boxes=1)
    assert len(case_dirs) == 2
    ct_image = nib.load(lists["img"][0])
    assert nib.aff2axcodes(ct_image.affine) == ("L", "P", "S")
    assert np.allclose(ct_image.header.get_zooms(), (3, 3, 3))
    # Same world position as the input: the voxel centre of the input's first voxel is a voxel centre here.
    source = nib.load(ct)
    corner = source.affine @ np.array([0, 0, 0, 1.0])
    index = np.linalg.solve(ct_image.affine, corner)
    assert np.allclose(index[:3], [source.shape[0] - 1, source.shape[1] - 1, 0])
    assert {path: _sha(path) for path in (ct, seg)} == hashes
    report = json.loads((exp / "preprocess_report.json").read_text())
    assert [case["status"] for case in report["cases"]] == ["done", "done"]
    assert report["cases"][0]["steps"] == ["inputs", "standardise", "segment", "report", "boxes"]
    assert all(seconds >= 0 for seconds in report["cases"][0]["seconds"].values())


def test_rerun_skips_and_is_identical_then_seed_decides(totalseg_example, tmp_path):
    ct, seg = totalseg_example / "example_ct_sm.nii.gz", totalseg_example / "example_seg.nii.gz"
    imgs, segs, attrs = _write_inputs(tmp_path, [(ct, seg, '{"organ type": "liver", "lesion type": "tumor"}')])
    exp = tmp_path / "exp"
    assert _run(imgs, exp, attrs, segs, "--spacing", "3", "--boxes-per-case", "3", "--seed", "11") == 0
    files = sorted(p for p in exp.rglob("*") if p.is_file() and p.name != "preprocess_report.json")
    first = {p: _sha(p) for p in files}
    mtimes = {p: p.stat().st_mtime_ns for p in files if p.parent != exp}
    assert _run(imgs, exp, attrs, segs, "--spacing", "3", "--boxes-per-case", "3", "--seed", "11") == 0
    assert json.loads((exp / "preprocess_report.json").read_text())["cases"][0]["status"] == "skipped"
    assert {p: _sha(p) for p in files} == first
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    lists = _lists(exp)
    _check_case(*(lists[name][0] for name in LISTS), organ_id=5, boxes=3)
    # --overwrite with the same seed reproduces the same boxes; another seed moves them.
    assert _run(imgs, exp, attrs, segs, "--spacing", "3", "--boxes-per-case", "3", "--seed", "11", "--overwrite") == 0
    assert {p: _sha(p) for p in files if p.name in ("bbox.nii.gz", "type.json")} == \
        {p: first[p] for p in files if p.name in ("bbox.nii.gz", "type.json")}
    assert _run(imgs, exp, attrs, segs, "--spacing", "3", "--boxes-per-case", "3", "--seed", "12") == 0
    assert json.loads((exp / "preprocess_report.json").read_text())["cases"][0]["status"] == "done"
    bbox = next(p for p in files if p.name == "bbox.nii.gz")
    assert _sha(bbox) != first[bbox]


def test_one_and_a_half_mm_keeps_geometry_and_the_organ(totalseg_example, tmp_path):
    ct, seg = totalseg_example / "example_ct_sm.nii.gz", totalseg_example / "example_seg.nii.gz"
    imgs, segs, attrs = _write_inputs(tmp_path, [(ct, seg, '{"organ type": "spleen", "lesion type": "cyst", '
                                                           '"size": [6, 5, 4], "density": "isodense lesion"}')])
    assert _run(imgs, tmp_path / "exp", attrs, segs, "--spacing", "1.5") == 0
    lists = _lists(tmp_path / "exp")
    image = nib.load(lists["img"][0])
    assert image.shape == (244, 202, 60) and np.allclose(image.header.get_zooms(), 1.5)
    assert np.allclose(np.abs(np.diag(image.affine)[:3]), 1.5)
    source = nib.load(ct)
    centre_before = source.affine @ np.r_[(np.array(source.shape) - 1) / 2, 1]
    centre_after = image.affine @ np.r_[(np.array(image.shape) - 1) / 2, 1]
    assert np.allclose(centre_before, centre_after)
    # The spleen keeps its volume in mm^3 (nearest resampling of a 3 mm label map onto 1.5 mm: exactly 8x voxels).
    spleen_before = (np.asanyarray(nib.load(seg).dataobj) == 1).sum()
    spleen_after = (np.asanyarray(nib.load(lists["seg"][0]).dataobj) == 1).sum()
    assert spleen_after == 8 * spleen_before
    report = _check_case(*(lists[name][0] for name in LISTS), organ_id=1, boxes=1)
    attributes = report["1"][2]
    assert attributes["density"] == "isodense lesion," and report["1"][3][1][0] == [6, 5, 4]
    assert list(attributes) == ["enhancement status", "lesion location", "shape", "size", "density",
                                "density variations", "CT value", "surface characteristics",
                                "relationship with adjacent organs", "specific features", "cavity"]


def test_bad_inputs_fail_their_case_with_a_one_line_reason(totalseg_example, tmp_path, capsys):
    ct, seg = totalseg_example / "example_ct_sm.nii.gz", totalseg_example / "example_seg.nii.gz"
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "fake.nii.gz").write_bytes(b"definitely not gzip")
    good = '{"organ type": "liver", "lesion type": "cyst"}'
    rows = [(ct, seg, good),
            (tmp_path / "missing.nii.gz", seg, good),
            (tmp_path / "notes.txt", seg, good),
            (tmp_path / "fake.nii.gz", seg, good),
            (ct, seg, '{"organ type": "livr", "lesion type": "cyst"}'),
            (ct, seg, '{"organ type": "urinary bladder", "lesion type": "tumor"}'),
            (ct, seg, '{"organ type": "liver", "lesion type": "cyst"'),
            (ct, seg, good)]
    imgs, segs, attrs = _write_inputs(tmp_path, rows)
    assert _run(imgs, tmp_path / "exp", attrs, segs, "--spacing", "3") == 1
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("FAILED")]
    expected = [
        r"FAILED case missing \(.*missing.nii.gz\): .*missing.nii.gz: file not found",
        r"FAILED case notes.txt \(.*notes.txt\): .*notes.txt: not a NIfTI file name",
        r"FAILED case fake \(.*fake.nii.gz\): .*fake.nii.gz: cannot read as NIfTI",
        r"FAILED case example_ct_sm-5 .*attrs.txt line 5: unknown organ name 'livr'; did you mean 'liver'",
        r"FAILED case example_ct_sm-6 .*organ 'urinary bladder' \(v1 id 104\) is absent from the segmentation .*example_seg",
        r"FAILED case example_ct_sm-7 .*attrs.txt line 7: not valid JSON",
    ]
    assert len(failed) == len(expected)
    for line, pattern in zip(failed, expected):
        assert re.match(pattern, line), line
    lists = _lists(tmp_path / "exp")
    assert [p.split("/")[-2] for p in lists["img"]] == ["example_ct_sm-1", "example_ct_sm-8"]
    report = json.loads((tmp_path / "exp" / "preprocess_report.json").read_text())
    assert [case["status"] for case in report["cases"]] == ["done"] + ["failed"] * 6 + ["done"]


def test_attribute_file_with_fewer_lines_stops_before_any_work(totalseg_example, tmp_path, capsys):
    ct, seg = totalseg_example / "example_ct_sm.nii.gz", totalseg_example / "example_seg.nii.gz"
    imgs, segs, attrs = _write_inputs(tmp_path, [(ct, seg, '{"organ type": "liver", "lesion type": "cyst"}')] * 2)
    attrs.write_text('{"organ type": "liver", "lesion type": "cyst"}\n')
    assert _run(imgs, tmp_path / "exp", attrs, segs) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "case 2 (" in err[0] and "attrs.txt has 1" in err[0]
    assert not (tmp_path / "exp").exists()


def test_parallel_workers_give_the_same_cases_as_one_worker(totalseg_example, tmp_path):
    ct, seg = totalseg_example / "example_ct_sm.nii.gz", totalseg_example / "example_seg.nii.gz"
    rows = [(ct, seg, f'{{"organ type": "{organ}", "lesion type": "{lesion}"}}')
            for organ, lesion in (("liver", "tumor"), ("spleen", "cyst"), ("kidney right", "stone"))]
    imgs, segs, attrs = _write_inputs(tmp_path, rows)
    for workers in ("1", "3"):
        assert _run(imgs, tmp_path / f"exp{workers}", attrs, segs, "--spacing", "3", "--workers", workers) == 0
    one, three = _lists(tmp_path / "exp1"), _lists(tmp_path / "exp3")
    for name in ("type", "bbox"):
        assert [_sha(Path(p)) for p in one[name]] == [_sha(Path(p)) for p in three[name]]
    assert [json.loads(Path(p).read_text()).popitem()[0] for p in one["type"]] == ["5", "1", "2"]
