"""List files: stripping, blank lines, relative entries against the list's folder, aligned lengths, errors."""
import os

import pytest

from ldm.data.lists import read_aligned_lists, read_list
from ldm.errors import DataError


def test_entries_stripped_blank_dropped_relative_to_list_dir(tmp_path, monkeypatch):
    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "image.txt").write_text("  case1/ct.nii.gz  \n\n../other/ct.nii.gz\n   \n/abs/ct.nii.gz\n")
    monkeypatch.chdir(tmp_path)
    entries = read_list("lists/image.txt")
    assert entries == [str(folder / "case1" / "ct.nii.gz"), str(tmp_path / "other" / "ct.nii.gz"), "/abs/ct.nii.gz"]
    monkeypatch.chdir(folder / "..")
    assert read_list(folder / "image.txt") == entries


def test_aligned_lists_and_absent_ones(tmp_path):
    (tmp_path / "a.txt").write_text("x1\nx2\n")
    (tmp_path / "b.txt").write_text("y1\n\ny2")
    named = {"image_list": tmp_path / "a.txt", "label_list": str(tmp_path / "b.txt"), "seg_list": None}
    lists = read_aligned_lists(named)
    assert list(lists) == ["image_list", "label_list"]
    assert [os.path.basename(p) for p in lists["label_list"]] == ["y1", "y2"]


def test_unequal_lengths_name_both_files_and_lengths(tmp_path):
    (tmp_path / "image.txt").write_text("a\nb\nc\n")
    (tmp_path / "label.txt").write_text("a\nb\n")
    with pytest.raises(DataError) as error:
        read_aligned_lists({"image_list": tmp_path / "image.txt", "label_list": tmp_path / "label.txt"})
    message = str(error.value)
    assert "image.txt" in message and "label.txt" in message and " 3 " in message and " 2:" in message


def test_missing_list_file(tmp_path):
    with pytest.raises(DataError, match="nope.txt: list file not found"):
        read_list(tmp_path / "nope.txt")
    (tmp_path / "a.txt").write_text("x\n")
    with pytest.raises(DataError, match="gone.txt"):
        read_aligned_lists({"image_list": tmp_path / "a.txt", "label_list": tmp_path / "gone.txt"})
