"""preprocess.py inputs: list lines resolve against the list's folder, then the current directory (both named when
neither holds the file); a --seg-list segmentation off its CT's grid is refused with that reason."""
import json

import nibabel as nib
import numpy as np
from conftest import TOTALSEG_EXAMPLE, require_shared

import preprocess
from preprocessing.inputs import read_input_list


def test_relative_lines_try_the_list_folder_then_the_current_directory(tmp_path, monkeypatch):
    lists, work = tmp_path / "lists", tmp_path / "work"
    (lists / "cts").mkdir(parents=True)
    (work / "cts").mkdir(parents=True)
    (lists / "cts" / "a.nii.gz").write_bytes(b"a")
    (work / "cts" / "a.nii.gz").write_bytes(b"shadowed")
    (work / "cts" / "b.nii.gz").write_bytes(b"b")
    (lists / "imgs.txt").write_text("cts/a.nii.gz\n\ncts/b.nii.gz\ncts/c.nii.gz\n/abs/d.nii.gz\n")
    monkeypatch.chdir(work)
    entries = read_input_list(lists / "imgs.txt")
    assert [path for path, _ in entries] == [str(lists / "cts/a.nii.gz"), str(work / "cts/b.nii.gz"),
                                            str(lists / "cts/c.nii.gz"), "/abs/d.nii.gz"]
    assert entries[2][1] == (str(lists / "cts/c.nii.gz"), str(work / "cts/c.nii.gz"))
    assert entries[3][1] == ("/abs/d.nii.gz",)


def test_missing_ct_names_both_paths_and_off_grid_segmentation_is_refused(tmp_path, monkeypatch, capsys):
    example = require_shared(TOTALSEG_EXAMPLE)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "imgs.txt").write_text(f"{example / 'example_ct_sm.nii.gz'}\nmissing.nii.gz\n")
    (tmp_path / "in" / "attrs.txt").write_text('{"organ type": "liver", "lesion type": "cyst"}\n' * 2)
    tiny = nib.Nifti1Image(np.zeros((10, 10, 10), dtype=np.uint8), np.eye(4))
    nib.save(tiny, tmp_path / "in" / "tiny_seg.nii.gz")
    (tmp_path / "in" / "segs.txt").write_text(f"tiny_seg.nii.gz\n{example / 'example_seg.nii.gz'}\n")
    status = preprocess.main(["in/imgs.txt", "exp", "in/attrs.txt", "--seg-list", "in/segs.txt", "--seg-version",
                              "v2", "--spacing", "3", "--no-progress"])
    assert status == 1
    cases = json.loads((tmp_path / "exp" / "preprocess_report.json").read_text())["cases"]
    assert "the segmentation's grid (10x10x10 voxels) does not match its CT" in cases[0]["error"]
    assert "122x101x30" in cases[0]["error"] and "absent" not in cases[0]["error"]
    assert cases[1]["error"] == (f"CT not found: tried {tmp_path / 'in' / 'missing.nii.gz'} (relative to the "
                                 f"list's folder) and {tmp_path / 'missing.nii.gz'} (relative to the current "
                                 "directory)")
    segmentation = nib.load(example / "example_seg.nii.gz")
    affine = segmentation.affine.copy()
    affine[:3, 3] += 4.0   # same shape, 4 mm off
    nib.save(nib.Nifti1Image(np.asanyarray(segmentation.dataobj), affine), tmp_path / "in" / "moved_seg.nii.gz")
    (tmp_path / "in" / "imgs.txt").write_text(f"{example / 'example_ct_sm.nii.gz'}\n")
    (tmp_path / "in" / "attrs.txt").write_text('{"organ type": "liver", "lesion type": "cyst"}\n')
    (tmp_path / "in" / "segs.txt").write_text("moved_seg.nii.gz\n")
    assert preprocess.main(["in/imgs.txt", "exp2", "in/attrs.txt", "--seg-list", "in/segs.txt", "--seg-version",
                            "v2", "--spacing", "3", "--no-progress"]) == 1
    (case,) = json.loads((tmp_path / "exp2" / "preprocess_report.json").read_text())["cases"]
    assert "the segmentation's affine does not match its CT" in case["error"]
